"""A tiny random-weight llama chat model, written as GGUF with the `gguf` package: no download from a hub.

Its vocabulary is SentencePiece's: three control tokens, the 256 byte tokens that llama.cpp falls back on for
any character it has no piece for, and the printable ASCII characters (`▁` for the space). The rows of the
output matrix for control and byte tokens are zero: their logit is always 0 while the best character's is
positive, so a greedy answer is plain text, one character a token, and never stops before `max_tokens`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, TokenType

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CONTROL = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{value:02X}>" for value in range(256)]
CHARACTERS = ["▁" if code == 0x20 else chr(code) for code in range(0x20, 0x7F)]


def write_tiny_llama(path: Path, *, embedding: int = 64, layers: int = 2, heads: int = 4, seed: int = 0) -> Path:
    tokens = CONTROL + BYTES + CHARACTERS
    never_sampled = len(CONTROL) + len(BYTES)
    vocab = len(tokens)
    feed_forward = 4 * embedding
    rng = np.random.default_rng(seed)

    def random(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(embedding)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(feed_forward)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(embedding // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)  # all F32

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

    output = random(vocab, embedding)
    output[:never_sampled] = 0.0
    writer.add_tensor("token_embd.weight", random(vocab, embedding))
    writer.add_tensor("output_norm.weight", np.ones(embedding, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for block in range(layers):
        prefix = f"blk.{block}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(embedding, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(prefix + name + ".weight", random(embedding, embedding))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(embedding, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", random(feed_forward, embedding))
        writer.add_tensor(prefix + "ffn_up.weight", random(feed_forward, embedding))
        writer.add_tensor(prefix + "ffn_down.weight", random(embedding, feed_forward))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
