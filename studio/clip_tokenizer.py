"""CLIP's BPE tokenizer built offline from the shipped OpenAI vocabulary (no checkpoint carries it, and the hub is
not reachable): the tokenizer of SD 1.x, SD 2.x and both SDXL text encoders."""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import tempfile
from pathlib import Path

from studio.atomic import atomic_path
from studio.models import CONFIGS_DIR

CLIP_BPE_FILE = CONFIGS_DIR / "clip" / "bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table: printable bytes map to themselves."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@functools.lru_cache(maxsize=1)
def clip_bpe_vocabulary() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's token -> id vocabulary and BPE merges ("a b" lines), built from the shipped OpenAI BPE file."""
    lines = gzip.decompress(CLIP_BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    base = list(_bytes_to_unicode().values())
    merge_count = CLIP_VOCAB_SIZE - 2 * len(base) - 2  # the vocabulary ends with the merges and 2 specials
    merges = tuple(lines[1 : 1 + merge_count])  # line 0 is a version header
    tokens = base + [token + "</w>" for token in base] + [merge.replace(" ", "") for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """The real CLIP BPE tokenizer (SD 1.x/2.x, both SDXL ones), built offline; SD 2.x / OpenCLIP pad with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocabulary()
    settings = {"pad_token": pad_token, "model_max_length": model_max_length}
    if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters:  # transformers >= 5 builds from memory
        return CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges], **settings)
    with tempfile.TemporaryDirectory(prefix="clip-tokenizer-") as directory:
        with atomic_path(Path(directory, "vocab.json")) as tmp:
            tmp.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        with atomic_path(Path(directory, "merges.txt")) as tmp:
            tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(directory, **settings)
