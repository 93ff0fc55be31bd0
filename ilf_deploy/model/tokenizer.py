"""Word-level stand-in for the T5 tokenizer, for tiny offline test pipelines.

The real T5 tokenizer is a 32k-piece SentencePiece model that must be downloaded; this one is built
from a word list, keeps T5's special-token ids (`<pad>`=0, `</s>`=1, `<unk>`=2) and appends `</s>`
like T5 does, so PixArt pipelines tokenize prompts with it exactly the way they use T5.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)  # list index == id, as in T5

_WORDS = """
a an the this that these those some one two three four five six seven eight nine ten many several
0 1 2 3 4 5 6 7 8 9
on at of with in into onto under over above below behind beside between near next to from by for
and or but not no without while as is are be being has have its their his her very
top bottom left right center centre middle corner edge side front back upper lower
red green blue yellow orange purple pink brown black white gray grey cyan magenta gold silver
dark light bright pale colorful colourful transparent striped dotted checkered
circle square triangle star rectangle hexagon pentagon diamond oval ellipse heart cross ring line
dot arrow cube sphere cone cylinder pyramid shape shapes
small large big tiny huge medium tall short long wide narrow thin thick giant little
background foreground scene image picture photo photograph painting drawing sketch illustration
portrait landscape render rendering style art artwork digital oil watercolor cartoon anime
realistic photorealistic detailed highly high quality resolution 4k 8k hd sharp blurry cinematic
lighting light shadow sunset sunrise night day morning evening sky cloud clouds sun moon stars
rain snow fog storm rainbow
cat cats dog dogs puppy kitten horse horses bird birds fish cow sheep pig lion tiger bear elephant
monkey rabbit fox wolf deer owl eagle duck chicken frog snake turtle butterfly dragon unicorn
man woman person people boy girl child children baby astronaut robot knight wizard king queen
chef doctor soldier pirate
riding sitting standing running walking flying swimming jumping sleeping eating holding wearing
playing looking smiling reading
car truck bus bicycle bike motorcycle train plane airplane boat ship rocket spaceship
house building city street road bridge tower castle church room kitchen table chair bed window
door wall floor
tree trees forest flower flowers grass garden field mountain mountains hill river lake ocean sea
beach sand desert island waterfall jungle park
water fire ice stone rock wood metal glass paper
apple banana orange cake pizza bread coffee tea cup bowl plate bottle
hat glasses shirt dress coat shoes umbrella book ball guitar
space planet mars earth galaxy universe
happy sad cute beautiful old young new ancient modern futuristic vintage
""".split()
_PUNCT = [",", ".", "!", "?", "-", "'", ":", ";", '"', "(", ")"]
DEFAULT_VOCAB: list[str] = list(dict.fromkeys(_WORDS + _PUNCT))


def build_word_tokenizer(words: Iterable[str] = DEFAULT_VOCAB) -> Tokenizer:
    """Lower-cased word-level tokenizer; unknown words map to `<unk>`, `</s>` is appended."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits words from punctuation
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}",
        pair=f"$A {EOS} $B {EOS}",
        special_tokens=[(EOS, vocab[EOS])],
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))  # never split / normalized, skipped on decode
    return tok


def save_tokenizer_dir(
    tokenizer: Tokenizer,
    out_dir: Path | str,
    model_max_length: int,
    specials: dict[str, str] | None = None,
) -> Path:
    """Write a directory that `AutoTokenizer.from_pretrained` loads as a fast tokenizer: T5-like by
    default, or with `specials` (e.g. CLIP's bos/eos/pad/unk tokens)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    specials = specials or {"pad_token": PAD, "eos_token": EOS, "unk_token": UNK}
    config = {
        # Not "T5Tokenizer": transformers would rebuild a Unigram model from the WordLevel vocab.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "padding_side": "right",
        "truncation_side": "right",
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out
