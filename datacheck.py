"""`train_vision_real.py --check-data`: read the sources as training would, train nothing, report.

    sources -> each source's examine(size): its training part (images decoded once) and problems
      -> conversations.measure: every sample encoded with the model's chat template (image tokens
         counted): its length and whether the context can train on it (tokenizer.kept_length)
      -> printed: a few samples with the supervised tokens in 【】, counts, the token-length
         distribution against the context, every problem with its sample id
Exit status 0 when nothing would make training wrong, 1 otherwise (problems found, nothing
supervised, image tokens cut by the context, placeholder / image mismatches, missing images).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from conversations import measure

SHOW = 3                          # samples printed with their supervised spans


@dataclass
class Tally:
    samples: int = 0
    images: int = 0
    distinct: int = 0             # different images (a sample may share one with others)
    turns: int = 0                # answers (assistant turns)
    text_only: int = 0
    system: int = 0               # samples with a system turn
    lengths: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def add(self, n_images: int, messages: list):
        self.samples += 1
        self.images += n_images
        self.turns += sum(m["role"] == "assistant" for m in messages)
        self.text_only += n_images == 0
        self.system += any(m["role"] == "system" for m in messages)


    def counts(self, system_turns: bool) -> str:
        """One line: samples, images, answers, text-only samples, system turns."""
        line = f"样本 {self.samples} 条，图片 {self.images} 张"
        line += f"（不同的 {self.distinct} 张）" if self.distinct != self.images else ""
        line += f"，回答 {self.turns} 轮，纯文字样本 {self.text_only} 条"
        if self.system:
            line += f"，带 system 轮的 {self.system} 条" + ("" if system_turns else "（内置模板没有 system 位置，训练时不用）")
        return line + "。"


def marked(tok, ids, labels) -> str:
    """The encoded sample as text: supervised spans in 【】, each run of image tokens as <image>×N."""
    out, k = [], 0
    while k < len(ids):
        j = k
        if ids[k] == tok.image_id:
            while j < len(ids) and ids[j] == tok.image_id:
                j += 1
            out.append(f"<image>×{j - k}")
        else:
            learnt = labels[k] != -100
            while j < len(ids) and ids[j] != tok.image_id and (labels[j] != -100) == learnt:
                j += 1
            text = tok.show(ids[k:j])
            out.append(f"【{text}】" if learnt else text)
        k = j
    return "".join(out)


def percentile(values: list, q: float) -> int:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def examine(data, limit, size: int) -> Tally:
    """Counts, lengths and problems of every source (data: sources.Sources, limit: sources.Limit);
    prints a few samples."""
    tok, image_tokens, max_len = limit.tok, limit.image_tokens, limit.max_len
    tally, shown = Tally(), 0
    for source in data.sources:
        part, problems = source.examine(size)
        tally.problems += problems
        if part is None:
            print(f"{source.name}：流式数据在训练时边读边用，这里不做全量检查。")
            continue
        tally.distinct += len(part.images)
        for k, (sid, tokens, supervised, why) in enumerate(measure(part, tok, image_tokens, max_len)):
            _, n_images, messages = part.chat(k)
            tally.add(n_images, messages)
            tally.lengths.append(tokens)
            if why:
                tally.problems.append(f"样本 {sid}：{why}")
            if shown < SHOW:
                shown += 1
                ids, labels = tok.encode_chat(messages, image_tokens, n_images)
                print(f"—— 样本 {sid}（{source.name}，{n_images} 张图片，{tokens} 个 token，其中要训练的 {supervised} 个）")
                print(marked(tok, ids, labels))
    return tally


def run(data, limit, size: int) -> int:
    """Print the report; the exit status (0: fine to train, 1: fix the data first)."""
    print("数据检查（不训练）。样本按训练时的对话模板展示，【】里是要训练的 token（回答及其结束符）：")
    t = examine(data, limit, size)
    tok, image_tokens, max_len = limit.tok, limit.image_tokens, limit.max_len
    print(t.counts(tok.system_turns))
    if t.lengths:
        over = sum(n > max_len for n in t.lengths)
        print(f"token 长度（含每张图 {image_tokens} 个图片 token，上下文 {max_len}）：最短 {min(t.lengths)}，"
              f"中位 {percentile(t.lengths, 0.5)}，p95 {percentile(t.lengths, 0.95)}，最长 {max(t.lengths)}；"
              f"超过上下文 {over} 条。")
    if not t.samples:
        t.problems.append("没有一条能用的样本")
    if t.problems:
        print(f"发现 {len(t.problems)} 个问题：")
        for p in t.problems:
            print(f"  {p}")
        print("这些问题会让训练出错或白练（有问题的样本训练时会被跳过），请先修复数据。格式见 docs/datasets.md。")
        return 1
    print("没有发现问题，可以开始训练（去掉 --check-data）。")
    return 0
