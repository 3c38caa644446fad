"""CLIP tokenization, and the small CLIP-format vocabulary shipped for the embedded `shapes` data.

The tokenizer is always `transformers.CLIPTokenizer` loaded from a local directory holding
`vocab.json` and `merges.txt` (77 tokens, padded with <|endoftext|>, truncated, as CLIP does).

A run with real CLIP weights reads the vocabulary from the same local directory as the text
encoder (`config.text_encoder.path`: the files of `openai/clip-vit-large-patch14`, `vocab.json`,
`merges.txt`, `tokenizer_config.json`, `special_tokens_map.json` beside `config.json` and
`model.safetensors`); `config.data.tokenizer_dir` names another directory (`tokenizer_dir_of`).
Nothing can be downloaded here, so the embedded default is a byte-level BPE vocabulary in exactly
CLIP's format (byte alphabet, `</w>` word-end suffix, CLIP's special tokens and pre-tokenization),
learned from `shapes` captions and shipped in `md_jax/data/assets/shapes_clip_tokenizer`.
Rebuild it with

    python -m md_jax.data.tokenizer --out=md_jax/data/assets/shapes_clip_tokenizer
"""

import json
import pathlib

import numpy as np
import transformers
from absl import app, flags

CONTEXT_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SHAPES_TOKENIZER_DIR = pathlib.Path(__file__).parent / "assets" / "shapes_clip_tokenizer"


def check_tokenizer_dir(path, what: str = "config.data.tokenizer_dir") -> pathlib.Path:
  """The tokenizer directory (default: the shipped `shapes` vocabulary), or one error naming
  `what` and the missing file."""
  if not path:
    return SHAPES_TOKENIZER_DIR
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{what}={str(path)!r} is not a directory")
  for name in ("vocab.json", "merges.txt"):
    if not (path / name).exists():
      raise FileNotFoundError(f"{what}={str(path)!r} has no {name} (a CLIP tokenizer's files)")
  return path


def tokenizer_dir_of(config) -> tuple[str, str]:
  """(directory, the config key that names it) of a run's vocabulary: `config.data.tokenizer_dir`
  when set; else the text encoder's own directory (`config.text_encoder.path`: a CLIP checkpoint
  carries the vocabulary it was trained with, and any other would feed it the wrong ids); else ""
  (the shipped `shapes` vocabulary)."""
  data = config.get("data") or {}
  if data.get("tokenizer_dir"):
    return data.tokenizer_dir, "config.data.tokenizer_dir"
  text_encoder = config.get("text_encoder") or {}
  if text_encoder.get("path"):
    return text_encoder.path, "config.text_encoder.path"
  return "", "config.data.tokenizer_dir"


def load_tokenizer(
  path: str | pathlib.Path | None = None, what: str = "config.data.tokenizer_dir"
) -> transformers.CLIPTokenizer:
  """Loads a CLIP tokenizer from a local directory (default: the shipped `shapes` vocabulary)."""
  path = check_tokenizer_dir(path, what)
  return transformers.CLIPTokenizer.from_pretrained(str(path), model_max_length=CONTEXT_LENGTH)


def tokenize(tokenizer, captions) -> np.ndarray:
  """Token ids (len(captions), 77) int32: <|startoftext|> ... <|endoftext|>, padded, truncated."""
  ids = tokenizer(
    list(captions),
    padding="max_length",
    truncation=True,
    max_length=CONTEXT_LENGTH,
    return_attention_mask=False,
  )["input_ids"]
  return np.asarray(ids, dtype=np.int32)


def _bytes_to_unicode() -> list[str]:
  """CLIP's (and GPT-2's) printable stand-in character for each of the 256 byte values."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  chars, extra = [], 0
  for b in range(256):
    if b in printable:
      chars.append(chr(b))
    else:
      chars.append(chr(256 + extra))
      extra += 1
  return chars


def build_clip_vocabulary(texts, out_dir: str | pathlib.Path, num_merges: int = 400) -> None:
  """Learns BPE merges from `texts` and writes them in the layout of CLIP's own vocabulary.

  Layout as in openai/clip-vit-large-patch14: 256 byte characters, the same with `</w>`, one token
  per merge in merge order, then <|startoftext|> and <|endoftext|>. Training uses CLIP's own
  normalizer and pre-tokenizer, so the merges apply exactly as `CLIPTokenizer` will apply them.
  """
  from tokenizers import Tokenizer, models, trainers

  clip = transformers.CLIPTokenizer()  # empty vocabulary, but CLIP's text preprocessing
  trainee = Tokenizer(
    models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix="</w>")
  )
  trainee.normalizer = clip.backend_tokenizer.normalizer
  trainee.pre_tokenizer = clip.backend_tokenizer.pre_tokenizer
  alphabet = _bytes_to_unicode()
  trainer = trainers.BpeTrainer(
    vocab_size=2 * len(alphabet) + num_merges,
    initial_alphabet=alphabet,
    end_of_word_suffix="</w>",
    show_progress=False,
  )
  trainee.train_from_iterator(list(texts), trainer=trainer)
  merges = json.loads(trainee.to_str())["model"]["merges"]
  merges = [m if isinstance(m, str) else " ".join(m) for m in merges][:num_merges]

  vocab = alphabet + [c + "</w>" for c in alphabet] + [m.replace(" ", "") for m in merges]
  vocab += [BOS, EOS]
  if len(set(vocab)) != len(vocab):
    raise ValueError("learned merges produced a duplicate token")
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
  (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  tokenizer_config = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": CONTEXT_LENGTH,
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": EOS,
    "unk_token": EOS,
    "do_lower_case": True,
  }
  (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def shapes_training_captions(count: int = 5000) -> list[str]:
  """Captions the shipped vocabulary is learned from (a fixed sample of the `shapes` grammar)."""
  from md_jax.data import shapes_scene

  rng = np.random.default_rng(1234)
  return [shapes_scene.sample_scene(rng).caption for _ in range(count)]


def main(argv):
  del argv
  build_clip_vocabulary(shapes_training_captions(), flags.FLAGS.out)
  print(f"wrote a CLIP-format vocabulary to {flags.FLAGS.out}")


if __name__ == "__main__":
  flags.DEFINE_string("out", str(SHAPES_TOKENIZER_DIR), "Output directory.")
  app.run(main)
