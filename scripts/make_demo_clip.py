"""Generate a tiny, randomly initialised CLIP checkpoint for offline demos and tests.

Everything is built locally and deterministically (no downloads, same bytes on every run): a
byte-level BPE tokenizer trained on a built-in caption corpus with CLIP's normaliser,
pre-tokenizer and ``</w>`` end-of-word suffix, a real ``CLIPImageProcessor`` config (resize the
shortest edge, centre crop, OpenAI CLIP mean/std) and a ``CLIPModel`` with seeded random float32
weights plus a trained-CLIP-like ``logit_scale``. The result loads with
``transformers.CLIPModel`` / ``CLIPProcessor`` and with vLLM as a pooling (embedding) model
(``CLIPModel`` -> ``CLIPEmbeddingModel``). Its embeddings are meaningless but depend on the input.

Usage:
    .venv/bin/python scripts/make_demo_clip.py [--out .models/demo-clip] [--force]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Keep tokenizer training single-threaded so merges are reproducible and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 0
INIT_STD = 0.15  # larger than CLIP's 0.02 so inputs visibly move the embeddings

# Upper bound for the learned BPE vocabulary (without specials); training also stops when the
# corpus has no pairs left to merge.
BPE_VOCAB_SIZE = 2048

# As in CLIP: the two specials come last, so token id 0 is an ordinary byte token ("!").
# vLLM's CLIP processor uses id 0 as its image placeholder and asserts it is not special.
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"  # also CLIP's unk and pad token
END_OF_WORD_SUFFIX = "</w>"

# transformers' CLIPTokenizer rebuilds its backend from vocab/merges with exactly this pipeline
# (models/clip/tokenization_clip.py); training uses the same one so merges match at load time.
CLIP_SPLIT_REGEX = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
    r"""|[^\s\p{L}\p{N}]+"""
)

MAX_POSITIONS = 77  # CLIP's text context length (vLLM's max_model_len comes from it)

TEXT_HIDDEN = 64
TEXT_HEADS = 1  # head_dim 64: vLLM's CPU attention rejects head_dim 16
TEXT_LAYERS = 2
TEXT_INTERMEDIATE = 256
VISION_HIDDEN = 64
VISION_HEADS = 1  # head_dim 64, like the text tower
VISION_LAYERS = 2
VISION_INTERMEDIATE = 256
PATCH_SIZE = 8
IMAGE_SIZE = 64  # 8 x 8 patches + CLS
PROJECTION_DIM = 64  # vLLM sizes its inputs_embeds buffer from it: keep >= TEXT_HIDDEN
# Trained CLIP checkpoints end with logit_scale = ln(100) (training clamps it there);
# the config keeps CLIP's init value ln(1/0.07), as the released configs do.
LOGIT_SCALE = math.log(100.0)

# OpenAI CLIP normalisation constants (transformers.image_utils.OPENAI_CLIP_MEAN/STD).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# Files whose presence marks a finished output directory (the build is staged and renamed, so
# a directory with these is never half-written).
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
)

_COLORS = "red green blue yellow orange purple black white gray brown pink cyan".split()
_SHAPES = "circle square triangle rectangle star line dot grid stripe cross ring blob".split()
_PLACES = "left right top bottom center corner middle edge background foreground".split()
_OBJECTS = (
    "cat dog car tree house person bird flower boat chair table cup book phone road sky "
    "mountain river building window door picture screen sign light cloud horse train "
    "bicycle plane apple pizza clock bench umbrella bottle cake kite elephant zebra giraffe"
).split()
_STYLES = (
    "a photo of|a picture of|an image of|a close-up photo of|a blurry photo of|a drawing of|"
    "a painting of|a sketch of|a cropped photo of|a bright photo of|a dark photo of|"
    "a black and white photo of|a low resolution photo of|a rendering of|a cartoon of"
).split("|")
_ADJECTIVES = (
    "small large bright dark round sharp blurry simple colorful striped plain tiny huge "
    "smooth rough empty busy quiet sunny cloudy old new happy sad wet dry"
).split()
_VERBS = "sitting standing lying running walking flying parked floating hanging".split()
_PREPS = "on in under near next to behind above beside".split()
_SCENES = (
    "grass street beach snow water table floor field road wall kitchen park room forest "
    "city desert sky garden shelf window"
).split()

# Common caption words, so BPE learns a realistic number of whole-word tokens.
_WORDS = """
about above across action animal another apple area around art baby back bag ball banana bank
basket bath beach bear beautiful bed bedroom beside big bike black blanket board body book
bottle bowl box boy branch bread bridge brown bus butter cake camera candle car card carrot
castle ceiling chair cheese child church city clean clock clothes coast coat coffee cold
computer cooking couch counter cow crowd cup curtain cutting dark day desk dinner dish doctor
dress drink driving eating egg empty evening eye face family farm fence field fish floor food
forest fork fruit game garden gate girl glass glasses glove goat grass green ground group guitar
hair hand hat head hill holding home hot hotel house ice inside island jacket jumping keyboard
kitchen knife lake lamp laptop leaf leg lemon library light lion living long looking man many
map market meal meat menu metal milk mirror monkey moon morning motorcycle mouse mouth music
narrow night ocean office old open orange outside oven paper park party path pattern people
pepper person phone piano pillow pink plant plate player playing pole pond pool poster pot
pretty rabbit rain red rice riding river rock roof room rope salad sand sandwich sheep shelf
ship shirt shoe shop short sidewalk sign silver sink skateboard ski skiing skis sleeping smiling
snow soccer sofa soup space spoon sport stop store storm street student suit surfboard surfing
sweet swimming table tall teddy tennis tent tie tiger toilet tomato tower town toy track traffic
train tray truck tv two three four five six umbrella vase vegetable video village wall watching
water wave wearing white wide wild window wine winter woman wood wooden young zoo
""".split()

_PARAGRAPHS = [
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in captions too.",
    'Punctuation: commas, periods. Questions? Exclamations! Quotes "like this" and (parens).',
    "It's a dog's life. They're here, we've seen it, I'm sure you'll like it and he'd agree.",
    "Il y a un chat sur la table. Der Hund spielt im Garten. El cielo es azul hoy.",
    "violence, weapons, blood, injury, self-harm, nudity, explicit content, safe for work.",
    "a screenshot of a website with text, a logo, a chart, a map, a diagram, a meme.",
]


def build_corpus() -> list[str]:
    """Deterministic training text: fixed paragraphs plus combinatorial CLIP-style captions."""
    lines = list(_PARAGRAPHS)
    for i, obj in enumerate(_OBJECTS):
        for j, style in enumerate(_STYLES):
            color = _COLORS[(i + j) % len(_COLORS)]
            adj = _ADJECTIVES[(i * 3 + j * 5) % len(_ADJECTIVES)]
            verb = _VERBS[(i + 2 * j) % len(_VERBS)]
            prep = _PREPS[(i * 5 + j) % len(_PREPS)]
            scene = _SCENES[(i * 7 + j * 3) % len(_SCENES)]
            lines.append(f"{style} a {adj} {color} {obj} {verb} {prep} the {scene}.")
            lines.append(f"{style} the {obj}.")
    for i, color in enumerate(_COLORS):
        for j, shape in enumerate(_SHAPES):
            place = _PLACES[(i + 2 * j) % len(_PLACES)]
            lines.append(f"A {color} {shape} in the {place} of a plain background.")
    for k in range(0, len(_WORDS), 6):
        chunk = _WORDS[k : k + 6]
        lines.append("a photo of " + " and ".join(chunk) + ".")
        lines.append(", ".join(reversed(chunk)) + "!")
    for n in range(0, 120, 7):
        lines.append(f"There are {n} {_OBJECTS[n % len(_OBJECTS)]}s in picture {n // 7}.")
    return lines


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character table (insertion order = CLIP's vocab order)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _merge_word(word: tuple[str, ...], a: str, b: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn merges on the corpus; return a CLIP-ordered vocab (specials last) and merges.

    The words come from the ``tokenizers`` normaliser and pre-tokenizer CLIPTokenizer uses, but
    the merges are learned here in plain Python: ``tokenizers``' BpeTrainer breaks ties between
    equally frequent pairs in hash-map order, which differs from process to process. Here the
    most frequent pair wins and ties go to the lexicographically smallest pair.
    """
    from collections import Counter
    from itertools import pairwise

    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_REGEX), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    word_counts: Counter[str] = Counter()
    for line in build_corpus():
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            word_counts[piece] += 1
    # Words as symbol tuples, the last symbol carrying the end-of-word suffix (as in CLIP).
    words: dict[tuple[str, ...], int] = {}
    for piece, count in sorted(word_counts.items()):
        symbols = (*piece[:-1], piece[-1] + END_OF_WORD_SUFFIX)
        words[symbols] = words.get(symbols, 0) + count

    byte_chars = list(bytes_to_unicode().values())
    base = byte_chars + [c + END_OF_WORD_SUFFIX for c in byte_chars]
    merges: list[tuple[str, str]] = []
    seen = set(base)
    while len(seen) < BPE_VOCAB_SIZE:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        seen.add(a + b)
        merged: dict[tuple[str, ...], int] = {}
        for word, count in words.items():
            new_word = _merge_word(word, a, b) if a in word and b in word else word
            merged[new_word] = merged.get(new_word, 0) + count
        words = merged

    # CLIP's layout: 256 byte tokens, the same 256 with "</w>", merge results in merge order,
    # then <|startoftext|>, <|endoftext|>. Every byte (alone or word-final) stays encodable.
    tokens = list(base)
    added = set(tokens)
    for a, b in merges:
        if a + b not in added:
            added.add(a + b)
            tokens.append(a + b)
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    # Merges only ever produce vocab entries, and their inputs are bytes or earlier results.
    assert all(a in vocab and b in vocab for a, b in merges)
    return vocab, merges


def build(out: Path) -> None:
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    print("[1/4] training byte-level BPE tokenizer (CLIP pipeline, </w> suffix)", flush=True)
    vocab, merges = train_bpe()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # (pairs are taken too; typed as str)
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MAX_POSITIONS,
    )
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    vocab_size = len(tokenizer)
    assert 0 not in tokenizer.all_special_ids, "vLLM's CLIP processor needs id 0 non-special"
    assert (bos_id, eos_id) == (vocab_size - 2, vocab_size - 1)
    sample = tokenizer("A photo of a cat.")["input_ids"]
    assert sample[0] == bos_id and sample[-1] == eos_id, sample
    print(
        f"      vocab={vocab_size} merges={len(merges)} bos={bos_id} eos/pad/unk={eos_id} "
        f"id0={tokenizer.convert_ids_to_tokens(0)!r}"
    )

    print("[2/4] building processor (CLIPImageProcessor + CLIPTokenizer)")
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": IMAGE_SIZE},
        resample=3,  # PIL bicubic, as in CLIP
        do_center_crop=True,
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        do_convert_rgb=True,
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)

    print("[3/4] initialising CLIPModel with seeded random weights")
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "projection_dim": PROJECTION_DIM,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "initializer_range": INIT_STD,
            # eos_token_id != 2 makes HF pool at the first EOS (not the argmax id).
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "pad_token_id": eos_id,
        },
        vision_config={
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "projection_dim": PROJECTION_DIM,
            "num_hidden_layers": VISION_LAYERS,
            "num_attention_heads": VISION_HEADS,
            "num_channels": 3,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "initializer_range": INIT_STD,
        },
        projection_dim=PROJECTION_DIM,
        dtype="float32",
    )
    config.architectures = ["CLIPModel"]
    text, vision = config.text_config, config.vision_config
    assert isinstance(text, CLIPTextConfig) and isinstance(vision, CLIPVisionConfig)
    assert text.projection_dim == vision.projection_dim
    assert config.projection_dim == PROJECTION_DIM >= TEXT_HIDDEN

    torch.manual_seed(SEED)
    model = CLIPModel(config).float().eval()
    # Re-initialise explicitly, in a fixed order, instead of relying on transformers' init
    # internals (which change between versions): norms=1, biases=0, everything else N(0, std).
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name == "logit_scale":
                param.fill_(LOGIT_SCALE)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"      params={n_params:,} (float32, {n_params * 4 / 2**20:.1f} MiB) "
        f"logit_scale={LOGIT_SCALE:.4f} (exp={math.exp(LOGIT_SCALE):.0f})"
    )

    print(f"[4/4] saving to {out}")
    hf_logging.disable_progress_bar()  # keep output to one line per step
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
    assert not missing, f"save_pretrained did not write {missing}"
    # mkdtemp and the weights writer leave owner-only modes; make everything world-readable
    # like a normal checkout (Ray workers or containers may run as another user).
    out.chmod(0o755)
    for path in out.iterdir():
        path.chmod(0o644)
    # Written last: its presence means the directory is complete (the Makefile's target).
    (out / ".complete").write_text("")
    (out / ".complete").chmod(0o644)
    print(f"      done in {time.perf_counter() - t0:.1f}s")


def is_complete(out: Path) -> bool:
    return out.is_dir() and all((out / name).is_file() for name in (*REQUIRED_FILES, ".complete"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".models/demo-clip"))
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    args = parser.parse_args(argv)
    out: Path = args.out

    if is_complete(out) and not args.force:
        print(f"demo CLIP already present at {out} (use --force to regenerate)")
        return 0

    # Stage in a sibling temp dir and rename, so an interrupted run never leaves a directory
    # that looks complete.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    print(f"demo CLIP written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
