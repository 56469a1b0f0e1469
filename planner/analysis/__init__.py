"""What a recipe costs, analytic or measured outside any runtime: footprint, activations, scratch, inspection,
sparsity and pruning, training, sensitivity, artifacts, --eval."""
