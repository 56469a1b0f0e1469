"""Public model architectures, built from their published configurations with random weights.

These are the public architectures used to check the planner on models it has no special knowledge of:
GPT-2 small, BERT-base, ResNet-50, MobileNetV2 and a small Llama, each built with Hugging Face
``transformers`` from its default (published) configuration, so the layer types, shapes, tied weights,
non-persistent buffers and ``ModelOutput`` return values are those of the real models. No weights are
downloaded: every factory initialises random weights (seed 0; the planner also seeds each call) and works
under ``with torch.device("meta")``, which is how the planner builds models weightless. The example inputs
are always created on the CPU with their own generator, so token ids are real ids even when the factory is
called on the meta device (a meta example input would be replaced by zeros).

Use them as ``planner plan examples/public_models.py:gpt2_small --budget 400MB``.
"""

from __future__ import annotations

import torch
from torch import nn


def _seed() -> None:
    torch.manual_seed(0)


def _token_ids(length: int, vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, length), generator=generator, dtype=torch.int64, device="cpu")


def _image(size: int = 224) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, size, size, generator=generator, device="cpu")


def gpt2_small() -> tuple[nn.Module, torch.Tensor]:
    """GPT-2 small (124M parameters, tied embedding and LM head), token ids 1×128."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _seed()
    config = GPT2Config()  # the default config, use_cache included: the planner handles the KV cache itself
    model = GPT2LMHeadModel(config)
    return model.eval(), _token_ids(128, config.vocab_size)


def bert_base() -> tuple[nn.Module, torch.Tensor]:
    """BERT-base uncased (110M parameters, with pooler), token ids 1×128."""
    from transformers import BertConfig, BertModel

    _seed()
    config = BertConfig()
    model = BertModel(config)
    return model.eval(), _token_ids(128, config.vocab_size)


def bert_tiny() -> tuple[nn.Module, torch.Tensor]:
    """A 2-layer BERT (hidden 128, 2 heads, intermediate 512; about 4.4M parameters), token ids 1×32."""
    from transformers import BertConfig, BertModel

    _seed()
    config = BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512)
    model = BertModel(config)
    return model.eval(), _token_ids(32, config.vocab_size)


def resnet50() -> tuple[nn.Module, torch.Tensor]:
    """ResNet-50 (ResNetConfig() defaults: bottleneck 3-4-6-3; 25.6M parameters), image 1×3×224×224."""
    from transformers import ResNetConfig, ResNetForImageClassification

    _seed()
    config = ResNetConfig(num_labels=1000)  # the published ImageNet head; the bare default has 2 labels
    model = ResNetForImageClassification(config)
    return model.eval(), _image()


def mobilenet_v2() -> tuple[nn.Module, torch.Tensor]:
    """MobileNetV2 1.0 (MobileNetV2Config() defaults; 3.5M parameters), image 1×3×224×224."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    _seed()
    config = MobileNetV2Config(num_labels=1001)  # the published ImageNet head (with background class)
    model = MobileNetV2ForImageClassification(config)
    _reinitialise_convolutions(model)
    return model.eval(), _image()


def _reinitialise_convolutions(model: nn.Module) -> None:
    """He initialisation (fan-in, so depthwise convolutions keep the scale too) instead of std 0.02.

    transformers initialises MobileNetV2's convolutions with normal(0, 0.02); with BatchNorm at its
    untrained running statistics every block then shrinks the signal, and the logits end near 1e-21: fp16
    underflows to zero and int8 activation scales collapse, so every comparison would be meaningless.
    Trained models keep activations near unit scale; He init gives random weights the same property.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0, 0.01)
            nn.init.zeros_(module.bias)


def tiny_llama() -> tuple[nn.Module, torch.Tensor]:
    """A small Llama (hidden 512, 4 layers, 8 heads, MLP 1376, vocab 32000, untied head), token ids 1×64."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _seed()
    config = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                         intermediate_size=1376, vocab_size=32000, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    return model.eval(), _token_ids(64, config.vocab_size)
