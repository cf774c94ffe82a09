"""A random-weight llama chat model, written as GGUF with the `gguf` package: no download from a hub.

`python -m bench.gguf_llama OUT.gguf --size 1b` writes a 1.0B-parameter model in f16 (Llama 3.2 1B's shape:
2048 wide, 16 layers, 32 heads, 8 KV heads, 8192 feed-forward) for measuring a real engine on a GPU; the tests
write the tiny default (64 wide, 2 layers, f32, 0.55 MiB).

Its vocabulary is SentencePiece's: three control tokens, the 256 byte tokens that llama.cpp falls back on for
any character it has no piece for, and the printable ASCII characters (`▁` for the space). The rows of the
output matrix for control and byte tokens are zero: their logit is always 0 while the best character's is
positive, so a greedy answer is plain text, one character a token, and never stops before `max_tokens`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONTROL = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{value:02X}>" for value in range(256)]
CHARACTERS = ["▁" if code == 0x20 else chr(code) for code in range(0x20, 0x7F)]


@dataclass(frozen=True)
class Shape:
    embedding: int
    layers: int
    heads: int
    kv_heads: int
    feed_forward: int
    f16: bool  # matrices in f16 (norms stay f32, as llama.cpp's converter writes them)


SIZES = {
    "tiny": Shape(embedding=64, layers=2, heads=4, kv_heads=4, feed_forward=256, f16=False),
    "1b": Shape(embedding=2048, layers=16, heads=32, kv_heads=8, feed_forward=8192, f16=True),
}


def parameters(shape: Shape) -> int:
    vocab = len(CONTROL) + len(BYTES) + len(CHARACTERS)
    kv = shape.embedding // shape.heads * shape.kv_heads
    attention = 2 * shape.embedding * shape.embedding + 2 * shape.embedding * kv
    block = attention + 3 * shape.embedding * shape.feed_forward + 2 * shape.embedding
    return shape.layers * block + 2 * vocab * shape.embedding + shape.embedding


def write_llama(path: Path, shape: Shape, *, context: int = 4096, seed: int = 0) -> Path:
    tokens = CONTROL + BYTES + CHARACTERS
    never_sampled = len(CONTROL) + len(BYTES)
    vocab = len(tokens)
    head_dim = shape.embedding // shape.heads
    rng = np.random.default_rng(seed)
    matrix_type = np.float16 if shape.f16 else np.float32

    def random(*shape_: int) -> np.ndarray:
        values = rng.standard_normal(shape_, dtype=np.float32)
        values /= np.sqrt(shape_[-1])
        return values.astype(matrix_type)

    def ones(size: int) -> np.ndarray:
        return np.ones(size, dtype=np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name(f"random-llama-{parameters(shape) / 1e9:.2f}B")
    writer.add_context_length(context)
    writer.add_embedding_length(shape.embedding)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.feed_forward)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(LlamaFileType.MOSTLY_F16 if shape.f16 else LlamaFileType.ALL_F32)

    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * never_sampled + [-float(i) for i in range(len(CHARACTERS))])
    control = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    writer.add_token_types(control + [TokenType.BYTE] * len(BYTES) + [TokenType.NORMAL] * len(CHARACTERS))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    output = random(vocab, shape.embedding)
    output[:never_sampled] = 0.0
    kv = head_dim * shape.kv_heads
    writer.add_tensor("token_embd.weight", random(vocab, shape.embedding))
    writer.add_tensor("output_norm.weight", ones(shape.embedding))
    writer.add_tensor("output.weight", output)
    for block in range(shape.layers):
        prefix = f"blk.{block}."
        writer.add_tensor(prefix + "attn_norm.weight", ones(shape.embedding))
        writer.add_tensor(prefix + "attn_q.weight", random(shape.embedding, shape.embedding))
        writer.add_tensor(prefix + "attn_k.weight", random(kv, shape.embedding))
        writer.add_tensor(prefix + "attn_v.weight", random(kv, shape.embedding))
        writer.add_tensor(prefix + "attn_output.weight", random(shape.embedding, shape.embedding))
        writer.add_tensor(prefix + "ffn_norm.weight", ones(shape.embedding))
        writer.add_tensor(prefix + "ffn_gate.weight", random(shape.feed_forward, shape.embedding))
        writer.add_tensor(prefix + "ffn_up.weight", random(shape.feed_forward, shape.embedding))
        writer.add_tensor(prefix + "ffn_down.weight", random(shape.embedding, shape.feed_forward))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama(path: Path, *, seed: int = 0) -> Path:
    return write_llama(path, SIZES["tiny"], seed=seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf_llama", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .gguf file to write")
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--context", type=int, default=131072, help="the model's context length (default 131072)")
    args = parser.parse_args(argv)
    shape = SIZES[args.size]
    write_llama(args.out, shape, context=args.context)
    size_mb = args.out.stat().st_size / 2**20
    sys.stdout.write(f"{args.out}: {parameters(shape) / 1e9:.3f}B parameters, {size_mb:.1f} MiB\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
