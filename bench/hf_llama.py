"""A tiny random-weight Llama in Hugging Face's format, written locally for vLLM: nothing is downloaded.

`python bench/hf_llama.py DIR` with an interpreter that has numpy, safetensors and tokenizers (vLLM's has them
all; the sidecar's needs none of them). DIR gets `config.json`, `model.safetensors` (random weights, float32,
about 1.6 MB) and a byte-level BPE tokenizer trained here on a few sentences, with a chat template.

The sizes are what vLLM's CPU attention takes: its kernels accept head sizes of 32, 64, 80, 96, 112, 128 and
more, not 16 (with 16 the server reports healthy, then the first request kills its engine).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HIDDEN = 128
HEADS = 4  # a head of 32
KV_HEADS = 2
LAYERS = 2
INTERMEDIATE = 256
CONTEXT = 2048
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


def _config(vocabulary: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocabulary,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HIDDEN // HEADS,
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


def _weights(vocabulary: int, seed: int) -> dict[str, Any]:
    import numpy as np

    rng = np.random.default_rng(seed)

    def random(*shape: int) -> Any:
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    head = HIDDEN // HEADS
    tensors = {"model.embed_tokens.weight": random(vocabulary, HIDDEN), "lm_head.weight": random(vocabulary, HIDDEN)}
    tensors["model.norm.weight"] = np.ones(HIDDEN, dtype=np.float32)
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}."
        tensors |= {
            prefix + "self_attn.q_proj.weight": random(HEADS * head, HIDDEN),
            prefix + "self_attn.k_proj.weight": random(KV_HEADS * head, HIDDEN),
            prefix + "self_attn.v_proj.weight": random(KV_HEADS * head, HIDDEN),
            prefix + "self_attn.o_proj.weight": random(HIDDEN, HEADS * head),
            prefix + "mlp.gate_proj.weight": random(INTERMEDIATE, HIDDEN),
            prefix + "mlp.up_proj.weight": random(INTERMEDIATE, HIDDEN),
            prefix + "mlp.down_proj.weight": random(HIDDEN, INTERMEDIATE),
            prefix + "input_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
            prefix + "post_attention_layernorm.weight": np.ones(HIDDEN, dtype=np.float32),
        }
    return tensors


def write_tiny_hf_llama(directory: Path, seed: int = 0) -> Path:
    """The model directory, written whole: config, weights, tokenizer."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    vocabulary = _tokenizer(directory)
    (directory / "config.json").write_text(json.dumps(_config(vocabulary), indent=2))
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    save_file(_weights(vocabulary, seed), str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    write_tiny_hf_llama(options.directory, options.seed)
    sys.stdout.write(f"{options.directory}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
