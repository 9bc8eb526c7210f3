"""Write CLIP's BPE tokenizer files (vocab.json, merges.txt) from OpenAI's bpe_simple_vocab_16e6.txt.gz.

Single-file checkpoints carry no tokenizer, so the engine ships CLIP's (MIT-licensed) vocabulary the way
ComfyUI does. The .gz ships inside the `open-clip-torch` wheel; this rebuilds the two files transformers
reads, with the same 49408 ids (start 49406, end 49407):

    pip download --no-deps -d /tmp/oc open_clip_torch && unzip -o /tmp/oc/*.whl 'open_clip/*.gz' -d /tmp/oc
    python scripts/make_clip_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz models/tokenizers/clip
"""
import gzip
import json
import sys
from pathlib import Path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-to-printable-character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def main(src: str, out_dir: str) -> None:
    lines = gzip.open(src).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
