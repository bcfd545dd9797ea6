"""Generate a tiny, randomly initialised Qwen2-VL model directory for offline demos and tests.

Everything is built locally and deterministically (no downloads): a byte-level BPE tokenizer
trained on a built-in corpus, Qwen2-VL-Instruct's chat template, the Qwen2-VL image/video
processor configs and a ``Qwen2VLForConditionalGeneration`` with seeded random float32 weights.
The result loads with ``transformers.AutoProcessor`` / ``AutoModelForImageTextToText`` and with
vLLM (CPU or GPU). Its outputs are meaningless but depend on the image, which is what tests need.

Usage:
    .venv/bin/python scripts/make_demo_model.py [--out .models/demo-vlm] [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Keep tokenizer training single-threaded so merges are reproducible and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SEED = 0
INIT_STD = 0.15  # larger than Qwen's 0.02 so image content visibly moves the logprobs

# BPE target size; specials are appended after the learned vocabulary (as in Qwen).
BPE_VOCAB_SIZE = 1536

# Same order as Qwen2-VL, so relative ids mirror the real tokenizer (151643 + i there).
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2's pre-tokenizer regex (transformers' Qwen2Tokenizer uses the same one).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL-Instruct's chat template with Qwen2.5's hermes-style tool calling (the released
# chat_template.json has vision and no tools, the tokenizer's has tools and no vision):
# <tools> in the system turn, <tool_call> JSON in the assistant's, <tool_response> from tools.
# vLLM parses the calls with --tool-call-parser hermes (engine.tool_call_parser). Without
# tools it renders exactly as Qwen2-VL-Instruct's template did.
CHAT_TEMPLATE = (Path(__file__).parent / "templates" / "qwen2_5_vl_chat.jinja").read_text()

# Image processor: the transformers class defaults (the released Qwen2-VL checkpoints ship
# max_pixels=12845056; 1280 merged tokens keeps CPU prefill cheap).
PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_PIXELS = 4 * 28 * 28  # 3136 == 56 * 56
MAX_PIXELS = 1280 * 28 * 28  # 1003520

TEXT_HIDDEN = 128
TEXT_HEADS = 2  # head_dim 64: vLLM's CPU attention rejects head_dim 16
TEXT_KV_HEADS = 2
TEXT_LAYERS = 2
TEXT_INTERMEDIATE = 256
HEAD_DIM = TEXT_HIDDEN // TEXT_HEADS
MROPE_SECTION = [8, 12, 12]  # must sum to head_dim / 2 (Qwen2-VL-7B: [16, 24, 24] for 128)
VISION_EMBED = 64
VISION_HEADS = 2
VISION_DEPTH = 2
MAX_POSITIONS = 32768

# Files whose presence marks a finished output directory (the build is staged and renamed, so
# a directory with these is never half-written).
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
)

_COLORS = "red green blue yellow orange purple black white gray brown pink cyan".split()
_SHAPES = "circle square triangle rectangle star line dot grid stripe cross ring blob".split()
_PLACES = "left right top bottom center corner middle edge background foreground".split()
_OBJECTS = (
    "cat dog car tree house person bird flower boat chair table cup book phone road sky "
    "mountain river building window door picture photo image screen sign light cloud"
).split()
_VERBS = "shows contains has depicts features displays includes presents".split()
_ADJECTIVES = (
    "small large bright dark round sharp blurry simple colorful striped plain tiny huge "
    "smooth rough empty busy quiet sunny cloudy old new"
).split()

# A few hundred common words so BPE has enough distinct merges to reach ~1.5k tokens.
_WORDS = """
about above across action active actually add address after again against age agree ahead air
all almost alone along already also although always among amount animal another answer any
apple area arm around art ask attention autumn available away baby back bad bag ball bank
base basket beach bear beautiful because become bed before begin behind believe below beside
best better between beyond bicycle big bill black blanket board body bottle bowl box boy
branch bread break bridge bring brother build burn bus business butter button buy cake call
camera candle cannot cap card care carry case castle catch cause ceiling certain chain chance
change character cheese chicken child choose church city class clean clear clock close clothes
coast coat coffee cold collect color come common company compare computer condition consider
continue control cook cool copy correct cost could country course cover cow create crowd
culture cut daily dance danger date daughter day dead deal decide deep desk detail develop
difference different dinner direction distance doctor dollar dream dress drink drive drop dry
during early earth east easy eat effect egg eight either electric elephant else energy engine
enjoy enough enter entire evening event every example expect experience explain eye face fact
fall family famous farm fast father feel fence few field fight figure fill final find fine
finger finish fire first fish five floor flow fly follow food foot force forest forget form
forward four free fresh friend front fruit full game garden gate general gentle giant girl
give glass glove goat gold good grass great green ground group grow guess guitar hair half hall
hand happen happy hard hat head health hear heart heavy help here high hill history hold hole
holiday home hope horse hospital hot hotel hour however human hundred idea important inside
instead interest island jacket job join journey juice jump just keep key kind king kitchen
kite knife know lake lamp land language laptop large last late laugh lead leaf learn leave leg
lemon letter level library life lift like line lion list listen little live long look lose
loud love low lunch machine main make man many map market match matter maybe meal mean measure
meat meet member memory metal method milk mind minute mirror miss moment money monkey month moon
more morning most mother motor mouse mouth move much music name narrow nation nature near neck
need never news next night nine noise north nose note nothing notice number ocean office often
oil open orange order other outside over own page paint pair paper parent park part party pass
path pattern pay peace pen pencil people pepper perhaps period pet piano pick piece pig pillow
place plan plane plant plate play please pocket point police pool poor position possible pot
power present pretty price print problem produce program public pull push queen question quick
rabbit race rain reach read ready real reason receive record region remember report rest result
return rice rich ride river rock roof room root rope rose row rule run safe salt same sand save
say school science sea season seat second see seed sell send sentence serve seven shadow shape
share sheep shelf ship shirt shoe shop short shoulder side silver simple since sing sister sit
six size skin skirt sleep slow smile smoke snake snow soap society sock soft soldier some son
song soon sound soup south space speak special speed spend spoon sport spring stage stair stand
start station stay step stick still stone stop store storm story street strong student study
subject sugar summer sun supper support surface surprise sweet swim system tail take talk tall
taste teacher team teeth telephone tell ten tent test thank thick thin thing think three through
throw ticket tiger time tired today together tomato tomorrow tonight tool tooth touch towel
tower town toy track train travel treat trouble truck true try turn twelve twenty two umbrella
under understand until upon use usual valley value vegetable very village visit voice wait walk
wall want warm wash watch water wave way weather week weight well west wheel while whole wide
wild wind wing winter wish with woman wonder wood word work world write year yellow young zebra
""".split()

_PARAGRAPHS = [
    "You are a helpful assistant. Describe the image in detail, and answer the question.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "What is in this picture? How many objects are there? What colors do you see?",
    "I can see a photo of a street with cars, people walking, and tall buildings nearby.",
    "The image is mostly empty, with a single shape in the middle and a plain background.",
    "Sure! Here is a short description: the scene is calm and the lighting is soft.",
    "Numbers like 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear in text too.",
    'Punctuation: commas, periods. Questions? Exclamations! Quotes "like this" and (parens).',
    "def describe(image): return model.generate(image, max_tokens=64, temperature=0.0)",
    "Il y a un chat sur la table. Der Hund spielt im Garten. El cielo es azul hoy.",
    "The answer is yes. The answer is no. I am not sure, but it looks like a drawing.",
]


def build_corpus() -> list[str]:
    """Deterministic training text: fixed paragraphs plus combinatorial caption sentences."""
    lines = list(_PARAGRAPHS)
    for i, color in enumerate(_COLORS):
        for j, shape in enumerate(_SHAPES):
            obj = _OBJECTS[(i * 7 + j) % len(_OBJECTS)]
            verb = _VERBS[(i + j) % len(_VERBS)]
            adj = _ADJECTIVES[(i * 3 + j * 5) % len(_ADJECTIVES)]
            place = _PLACES[(i + 2 * j) % len(_PLACES)]
            lines.append(
                f"The {adj} image {verb} a {color} {shape} near the {place}, next to a {obj}."
            )
            lines.append(f"Is there a {color} {obj} in the {place}? Yes, a {adj} one.")
    # Words in running text (" word") and at line starts ("Word") become different tokens.
    for k in range(0, len(_WORDS), 8):
        chunk = _WORDS[k : k + 8]
        lines.append(" ".join(chunk) + ".")
        lines.append(", ".join(w.capitalize() for w in reversed(chunk)) + "!")
    for n in range(0, 200, 7):
        lines.append(f"There are {n} {_OBJECTS[n % len(_OBJECTS)]}s in picture {n // 7}.")
    return lines


def train_tokenizer() -> Tokenizer:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    # Same pipeline as transformers' Qwen2Tokenizer, which rebuilds the backend from
    # vocab/merges on load: results must match whichever path loads the files.
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        # Every byte gets a token so any input is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    # Specials go after the learned vocab, like Qwen's added tokens (ids >= BPE vocab size).
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def build(out: Path) -> None:
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.utils import logging as hf_logging

    t0 = time.perf_counter()
    print("[1/4] training byte-level BPE tokenizer", flush=True)
    backend = train_tokenizer()
    # Qwen2Tokenizer (not a generic fast tokenizer) so tokenizer_config names the Qwen class;
    # on load it rebuilds the backend from vocab/merges with the same pipeline as above.
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,  # type: ignore[arg-type]  # (Qwen has none; typed as str)
        extra_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=MAX_POSITIONS,
        chat_template=CHAT_TEMPLATE,
    )
    ids = {t: token_id(tokenizer, t) for t in SPECIAL_TOKENS}
    vocab_size = len(tokenizer)
    print(f"      vocab={vocab_size} (bpe={backend.get_vocab_size(False)}) specials={ids}")

    print("[2/4] building processor (image + video) with Qwen2-VL-Instruct chat template")
    # Images and videos share one patch geometry.
    geometry = {
        "min_pixels": MIN_PIXELS,
        "max_pixels": MAX_PIXELS,
        "patch_size": PATCH_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        "merge_size": MERGE_SIZE,
    }
    image_processor = Qwen2VLImageProcessor(**geometry)
    video_processor = Qwen2VLVideoProcessor(**geometry)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )

    print("[3/4] initialising Qwen2VLForConditionalGeneration with seeded random weights")
    assert sum(MROPE_SECTION) == HEAD_DIM // 2, "mrope_section must cover head_dim / 2"
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": TEXT_HIDDEN,
            "intermediate_size": TEXT_INTERMEDIATE,
            "num_hidden_layers": TEXT_LAYERS,
            "num_attention_heads": TEXT_HEADS,
            "num_key_value_heads": TEXT_KV_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
            "max_window_layers": TEXT_LAYERS,
            "rms_norm_eps": 1e-6,
            "initializer_range": INIT_STD,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1_000_000.0,
                "mrope_section": MROPE_SECTION,
            },
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "dtype": "float32",
        },
        vision_config={
            "depth": VISION_DEPTH,
            "embed_dim": VISION_EMBED,
            "hidden_size": TEXT_HIDDEN,  # merger output must match the text width
            "num_heads": VISION_HEADS,
            "mlp_ratio": 4,
            "patch_size": PATCH_SIZE,
            "spatial_merge_size": MERGE_SIZE,
            "temporal_patch_size": TEMPORAL_PATCH_SIZE,
            "in_channels": 3,
            "initializer_range": INIT_STD,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.bos_token_id = ids["<|endoftext|>"]
    config.eos_token_id = ids["<|im_end|>"]
    config.pad_token_id = ids["<|endoftext|>"]

    torch.manual_seed(SEED)
    model = Qwen2VLForConditionalGeneration(config).float().eval()
    # Re-initialise explicitly, in a fixed order, instead of relying on transformers' init
    # internals (which change between versions): norms=1, biases=0, everything else N(0, std).
    generator = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * INIT_STD)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"      params={n_params:,} (float32, {n_params * 4 / 2**20:.1f} MiB)")

    print(f"[4/4] saving to {out}")
    hf_logging.disable_progress_bar()  # keep output to one line per step
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # processor.save_pretrained already writes chat_template.jinja (read by both the processor
    # and the tokenizer in transformers 5); rewrite it so the file is guaranteed byte-exact.
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    # Also embed it in tokenizer_config.json for readers that only look there (transformers 4.x).
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text(encoding="utf-8"))
    tok_cfg["chat_template"] = CHAT_TEMPLATE
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", "utf-8")
    # mkdtemp and the weights writer leave owner-only modes; make everything world-readable
    # like a normal checkout (Ray workers or containers may run as another user).
    out.chmod(0o755)
    for path in out.iterdir():
        path.chmod(0o644)
    print(f"      done in {time.perf_counter() - t0:.1f}s")


def is_complete(out: Path) -> bool:
    return out.is_dir() and all((out / name).is_file() for name in REQUIRED_FILES)


def token_id(tokenizer: Any, token: str) -> int:
    """The id of one token (convert_tokens_to_ids is typed for lists too)."""
    found = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(found, int), token
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(".models/demo-vlm"))
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    args = parser.parse_args(argv)
    out: Path = args.out

    if is_complete(out) and not args.force:
        print(f"demo model already present at {out} (use --force to regenerate)")
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
    print(f"demo model written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
