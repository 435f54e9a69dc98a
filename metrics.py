"""Caption metrics as the COCO caption evaluation computes them: BLEU-4 and CIDEr-D.

Both take pre-tokenised text (lists of tokens) so that the tokenisation is a visible choice:
    tokenize("A dog runs.")      -> ["a", "dog", "runs"]            (English: words)
    tokenize("一只狗在跑。")       -> ["一", "只", "狗", "在", "跑"]     (Chinese: characters)
Punctuation is dropped and text lowercased, like the PTB tokenizer step of the COCO toolkit.
Character tokens are the dependency-free convention for Chinese; a word segmenter would give
very different CIDEr values, so every report says which tokenisation it used.

BLEU-4: corpus level, clipped n-gram precisions, brevity penalty against the closest reference
length (ties: the shorter). CIDEr-D: tf-idf weighted 1-4-gram vectors with document frequency
from the evaluated set's references, clipped by the reference, a Gaussian length penalty
(sigma 6), averaged over references and n, times 10. Both follow pycocoevalcap to the last
detail (including its small constants and its length defined by bigram count), so numbers
are comparable with published ones.
"""
from __future__ import annotations

import math
import re
from collections import Counter

CJK_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
CJK = re.compile(f"[{CJK_CHARS}]")
WORD = f"(?:(?![{CJK_CHARS}])[^\\W_])+"                     # letters/digits, not CJK
TOKEN = re.compile(f"[{CJK_CHARS}]|{WORD}(?:'{WORD})?")
TOKENISATION_ZH = {"char": "汉字逐字切分", "word": "英文按词切分"}


def tokenisation_for(texts) -> str:
    """"char" if most texts contain CJK characters, else "word"."""
    texts = list(texts)
    cjk = sum(bool(CJK.search(t)) for t in texts)
    return "char" if texts and cjk * 2 >= len(texts) else "word"


def tokenize(text: str, mode: str = "auto") -> list[str]:
    """Lowercased tokens without punctuation. mode: char (each CJK character one token, Latin
    runs stay words) | word (whitespace/punctuation separated words) | auto (char if CJK)."""
    text = text.lower()
    if mode == "auto":
        mode = "char" if CJK.search(text) else "word"
    if mode == "char":
        return TOKEN.findall(text)
    if mode == "word":
        return re.findall(r"[^\W_]+(?:'[^\W_]+)?", text)
    raise ValueError(f"unknown tokenisation {mode!r}")


def ngrams(tokens, n: int = 4) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def bleu(refs, hyps, n: int = 4) -> float:
    """Corpus BLEU-n. refs: per item a list of token lists; hyps: per item one token list."""
    small, tiny = 1e-9, 1e-15
    testlen = reflen = 0
    guess, correct = [0] * n, [0] * n
    for rs, h in zip(refs, hyps, strict=True):
        maxcounts = Counter()
        for r in rs:
            maxcounts |= ngrams(r, n)                     # per-n-gram maximum over references
        lens = [len(r) for r in rs]
        testlen += len(h)
        reflen += min((abs(l - len(h)), l) for l in lens)[1]
        for k in range(n):
            guess[k] += max(0, len(h) - k)
        for g, c in ngrams(h, n).items():
            correct[len(g) - 1] += min(maxcounts[g], c)
    score = 1.0
    for k in range(n):
        score *= (correct[k] + tiny) / (guess[k] + small)
    score **= 1.0 / n
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


def cider_d(refs, hyps, n: int = 4, sigma: float = 6.0) -> float:
    """Mean CIDEr-D over items. idf comes from the references of this set, so the value depends
    on the set; it is 0 for a set of one image (log(1) = 0)."""
    ref_counts = [[ngrams(r, n) for r in rs] for rs in refs]
    df = Counter()
    for rs in ref_counts:
        df.update(set().union(*rs))
    log_n = math.log(len(refs))

    def vec(counts):
        v = [{} for _ in range(n)]
        norm = [0.0] * n
        for g, tf in counts.items():
            w = tf * (log_n - math.log(max(1.0, df[g])))
            v[len(g) - 1][g] = w
            norm[len(g) - 1] += w * w
        length = sum(tf for g, tf in counts.items() if len(g) == 2)   # as in the reference code
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for rs, h in zip(ref_counts, hyps, strict=True):
        vh, nh, lh = vec(ngrams(h, n))
        total = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total += val * penalty
        scores.append(total / n / len(rs) * 10.0)
    return sum(scores) / len(scores) if scores else 0.0


def caption_scores(references, predictions, mode: str = "auto") -> dict:
    """references: per item a list of caption strings; predictions: per item one string.
    Returns {"bleu4", "cider", "tokenisation", "items"}."""
    if mode == "auto":
        mode = tokenisation_for(r for rs in references for r in rs)
    refs = [[tokenize(r, mode) for r in rs] for rs in references]
    hyps = [tokenize(p, mode) for p in predictions]
    if not refs:
        return {"bleu4": 0.0, "cider": 0.0, "tokenisation": mode, "items": 0}
    return {"bleu4": bleu(refs, hyps), "cider": cider_d(refs, hyps), "tokenisation": mode, "items": len(refs)}
