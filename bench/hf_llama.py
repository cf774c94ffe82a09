"""A tiny random-weight Llama in Hugging Face's format, written locally for vLLM: nothing is downloaded.

`python bench/hf_llama.py DIR` with an interpreter that has numpy, safetensors and tokenizers (vLLM's has them
all; the sidecar's needs none of them). DIR gets `config.json`, `model.safetensors` (random weights, float32:
1.6 MB with `--size tiny`, 45 MB with `--size small`) and a byte-level BPE tokenizer trained here on a few
sentences, with a chat template. `--lora ADAPTER_DIR` writes a LoRA adapter for the model too.

The sizes are what vLLM's CPU attention takes: its kernels accept head sizes of 32, 64, 80, 96, 112, 128 and
more, not 16 (with 16 the server reports healthy, then the first request kills its engine).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Size:
    hidden: int
    heads: int
    kv_heads: int
    layers: int
    intermediate: int

    @property
    def head(self) -> int:
        return self.hidden // self.heads


SIZES = {
    # 1.6 MB: the fastest vLLM answers. Its tokens come about a millisecond apart, so fast that on two cores
    # vLLM's own server falls behind relaying them (its /metrics then answers only after the streams end).
    "tiny": Size(hidden=128, heads=4, kv_heads=2, layers=2, intermediate=256),
    # 45 MB: about 7 ms a token on this machine class, where vLLM's server keeps up with a few streams.
    "small": Size(hidden=512, heads=8, kv_heads=2, layers=4, intermediate=1408),
}
CONTEXT = 2048
LORA_RANK = 8
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0-3, in this order
CHAT_TEMPLATE = (
    "{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
# What the tokenizer learns its merges from: enough text for a few hundred tokens of vocabulary.
CORPUS = [
    "Name three clocks. A clock tells the time; a water clock, a sundial and a pendulum clock are three.",
    "Once upon a time there was a small model that answered every question with random words.",
    "The sidecar measures the time to the first token, the time per output token and the latency.",
    "Tell me about clocks, engines, tokens, streams, requests and the way a proxy relays them.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]


def _tokenizer(directory: Path) -> int:
    """Train and write the tokenizer; its vocabulary's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "model_max_length": CONTEXT,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    vocabulary: int = tokenizer.get_vocab_size()
    return vocabulary


def _config(vocabulary: int, size: Size) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocabulary,
        "hidden_size": size.hidden,
        "intermediate_size": size.intermediate,
        "num_hidden_layers": size.layers,
        "num_attention_heads": size.heads,
        "num_key_value_heads": size.kv_heads,
        "head_dim": size.head,
        "max_position_embeddings": CONTEXT,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": SPECIAL.index("<s>"),
        "eos_token_id": SPECIAL.index("</s>"),
        "pad_token_id": SPECIAL.index("<pad>"),
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def _weights(vocabulary: int, size: Size, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def random(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    hidden, head, heads, kv_heads, intermediate = size.hidden, size.head, size.heads, size.kv_heads, size.intermediate
    tensors = {"model.embed_tokens.weight": random(vocabulary, hidden), "lm_head.weight": random(vocabulary, hidden)}
    tensors["model.norm.weight"] = np.ones(hidden, dtype=np.float32)
    for layer in range(size.layers):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "self_attn.q_proj.weight": random(heads * head, hidden),
            prefix + "self_attn.k_proj.weight": random(kv_heads * head, hidden),
            prefix + "self_attn.v_proj.weight": random(kv_heads * head, hidden),
            prefix + "self_attn.o_proj.weight": random(hidden, heads * head),
            prefix + "mlp.gate_proj.weight": random(intermediate, hidden),
            prefix + "mlp.up_proj.weight": random(intermediate, hidden),
            prefix + "mlp.down_proj.weight": random(hidden, intermediate),
            prefix + "input_layernorm.weight": np.ones(hidden, dtype=np.float32),
            prefix + "post_attention_layernorm.weight": np.ones(hidden, dtype=np.float32),
        }
    return tensors


def write_hf_llama(directory: Path, seed: int = 0, size: Size = SIZES["tiny"]) -> Path:
    """The model directory, written whole: config, weights, tokenizer."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = _tokenizer(directory)
    (directory / "config.json").write_text(json.dumps(_config(vocabulary, size), indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(_weights(vocabulary, size, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def write_lora_adapter(directory: Path, size: Size = SIZES["tiny"], seed: int = 1, rank: int = LORA_RANK) -> Path:
    """A LoRA adapter for a model of this size in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`) on
    the attention's q and v projections. Its B matrices are not zero (PEFT starts them at zero), so the adapter
    changes what the model says: a request that names it is told apart from one that does not."""
    import numpy as np
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    outputs = {"q_proj": size.heads * size.head, "v_proj": size.kv_heads * size.head}
    tensors = {}
    for layer in range(size.layers):
        for module, width in outputs.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}."
            tensors[prefix + "lora_A.weight"] = (rng.standard_normal((rank, size.hidden)) * 0.5).astype(np.float32)
            tensors[prefix + "lora_B.weight"] = (rng.standard_normal((width, rank)) * 0.5).astype(np.float32)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted(outputs),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--lora", type=Path, help="also write a LoRA adapter for the model in this directory")
    options = parser.parse_args(argv)
    size = SIZES[options.size]
    write_hf_llama(options.directory, options.seed, size)
    if options.lora is not None:
        write_lora_adapter(options.lora, size)
    sys.stdout.write(f"{options.directory}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
