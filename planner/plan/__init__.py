"""The plan: run_plan and evaluate(recipe, runtime) (pipeline), and the mixed-precision search (mixed_plan)."""
