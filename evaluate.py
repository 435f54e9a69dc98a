"""Measure a checkpoint.

Synthetic scenes (the demo's test split, never trained on):
    python evaluate.py --checkpoint checkpoints/vision_trained_model.pt --scenes 200
prints exact-match caption accuracy (the set of (position, colour, shape) named equals the
truth), per-attribute accuracy, Q&A accuracy, for seen combinations and for held-out
(colour, shape) combinations separately.

Real captioned images (a local folder or a Hugging Face data set, as train_vision_real.py reads them):
    python evaluate.py --checkpoint checkpoints/vision_trained_model.pt --data-path data/vision_train
    python evaluate.py --checkpoint ... --dataset-name nlphuji/flickr30k --split test --count 500
prints BLEU-4 and CIDEr-D of greedy captions against all references (character tokens for
Chinese, words for English) and a few examples.
"""
from __future__ import annotations

import json
import random
import sys
import time

import torch

import scenes
from collate import Collator
from errors import ArgumentParser, UserError, cli


@torch.no_grad()
def generate_texts(model, tokenizer, samples, max_new_tokens=64, batch_size=64, **sampling):
    """Answer each sample's prompt ({"image", "messages"}), batched with left padding."""
    collate = Collator(tokenizer, model.cfg, train=False)
    device = next(model.parameters()).device
    out = []
    for b in range(0, len(samples), batch_size):
        batch = collate(samples[b:b + batch_size])
        pixels = batch["pixels"].to(device) if batch["pixels"] is not None else None
        cols = list(model.generate(batch["input_ids"].to(device), pixels, batch["attention_mask"].to(device),
                                   max_new_tokens=max_new_tokens, **sampling))
        toks = torch.stack(cols, 1).tolist() if cols else [[] for _ in range(len(batch["input_ids"]))]
        for row in toks:
            if tokenizer.eos_id in row:
                row = row[:row.index(tokenizer.eos_id)]
            out.append(tokenizer.decode(row).strip())
    return out


def normalise(answer: str) -> str:
    return answer.strip().rstrip("。.!！").strip().lower()


def evaluate_scenes(model, tokenizer, count=200, split="test", seed=0, lang="zh", batch_size=64):
    """Captions and one question of each kind per scene; returns a dict of accuracies (0..1)."""
    size = model.cfg.vit_image_size
    objs_list, images = [], []
    for i in range(count):
        objs, rng = scenes.make_scene(seed, split, i)
        objs_list.append(objs)
        images.append(scenes.render(objs, rng, size))
    prompt = scenes.CAPTION_PROMPTS[lang][0]
    caps = generate_texts(model, tokenizer, [{"image": im, "messages": [{"role": "user", "content": prompt}]}
                                              for im in images], batch_size=batch_size)
    exact = count_ok = 0
    attr = {"position": 0, "colour": 0, "shape": 0}
    n_obj = 0
    heldout_obj = heldout_ok = 0
    for objs, cap in zip(objs_list, caps):
        truth = {(o.cell, o.colour, o.shape) for o in objs}
        pred = scenes.parse_caption(cap, lang)
        exact += pred == truth
        count_ok += len(pred) == len(truth)
        by_cell = {c: (col, s) for c, col, s in pred}
        for o in objs:
            n_obj += 1
            p = by_cell.get(o.cell)
            attr["position"] += p is not None
            attr["colour"] += p is not None and p[0] == o.colour
            attr["shape"] += p is not None and p[1] == o.shape
            if (o.colour, o.shape) in scenes.HELDOUT:
                heldout_obj += 1
                heldout_ok += p == (o.colour, o.shape)
    qa_samples, qa_truth, qa_kind = [], [], []
    for i, (objs, im) in enumerate(zip(objs_list, images)):
        rng = random.Random(f"qa/{seed}/{i}")
        by_kind = {}
        for kind, q, a, _ in scenes.questions(objs, lang):
            by_kind.setdefault(kind, []).append((q, a))
        for kind, qas in sorted(by_kind.items()):
            q, a = rng.choice(qas)
            qa_samples.append({"image": im, "messages": [{"role": "user", "content": q}]})
            qa_truth.append(a)
            qa_kind.append(kind)
    answers = generate_texts(model, tokenizer, qa_samples, max_new_tokens=24, batch_size=batch_size)
    ok = [normalise(a) == normalise(t) for a, t in zip(answers, qa_truth)]
    result = {"scenes": count, "split": split, "caption_exact": exact / count, "count": count_ok / count,
              **{k: v / n_obj for k, v in attr.items()},
              "qa": sum(ok) / len(ok),
              **{f"qa_{k}": sum(o for o, kk in zip(ok, qa_kind) if kk == k) / qa_kind.count(k)
                 for k in sorted(set(qa_kind))}}
    if heldout_obj:
        result["heldout_objects"] = heldout_ok / heldout_obj
    result["examples"] = [{"truth": scenes.caption(o, lang), "prediction": c} for o, c in zip(objs_list[:3], caps[:3])]
    return result


def evaluate_captions(model, tokenizer, items, prompt, batch_size=32, max_new_tokens=48, examples=3):
    """items: [(PIL image, [reference captions])] -> {"bleu4", "cider", "tokenisation", "items",
    "examples"} for greedy captions answering `prompt`."""
    from metrics import caption_scores
    preds = generate_texts(model, tokenizer, [{"image": im, "messages": [{"role": "user", "content": prompt}]}
                                              for im, _ in items], max_new_tokens=max_new_tokens, batch_size=batch_size)
    result = caption_scores([refs for _, refs in items], preds)
    result["examples"] = [{"prediction": p, "references": refs[:3]} for p, (_, refs) in zip(preds[:examples], items)]
    return result


def print_caption_scores(r, prefix=""):
    from metrics import TOKENISATION_ZH
    print(f"{prefix}BLEU-4: {r['bleu4']:.4f}  CIDEr-D: {r['cider']:.4f}"
          f"（{r['items']} 张图，{TOKENISATION_ZH[r['tokenisation']]}）", flush=True)
    for ex in r["examples"]:
        print(f"  生成: {ex['prediction']}  |  参考: {' / '.join(ex['references'])}", flush=True)


def evaluate_real(a, model, tok):
    import captions
    import sources
    o = sources.Options(split=a.split, image_column=a.image_column, caption_column=a.caption_column)
    source = sources.read("local", a.data_path, o) if a.data_path else sources.read("huggingface", a.dataset_name, o)
    if not source.has_captions:
        raise UserError(f"{source.name} 是对话数据，没有参考描述，算不了 BLEU-4 / CIDEr-D。合成场景的对话版用不带 "
                        f"--data-path 的 evaluate.py（可加 --pairs）评估。")
    data = source.checked(model.cfg.vit_image_size, max_bad_ratio=1.0)
    if not len(data):
        raise UserError("没有可用于评估的图片。")
    n = min(a.count, len(data))
    items = [(data.image(k), data.references(k)) for k in range(n)]
    lang = captions.caption_language(c for _, refs in items for c in refs)
    longest = max(len(tok.encode(c)) for _, refs in items for c in refs)
    result = evaluate_captions(model, tok, items, captions.PROMPT_ZH if lang == "zh" else captions.PROMPT_EN,
                               max_new_tokens=min(64, longest + 8))
    print_caption_scores(result)
    return result


def pad(text: str, width: int) -> str:
    """Left-justify to a display width (CJK characters take two columns in a terminal)."""
    return text + " " * max(0, width - sum(2 if ord(c) > 0x2e80 else 1 for c in text))


def print_table(results):
    rows = [("精确匹配（描述完全正确）", "caption_exact"), ("形状数量", "count"), ("位置", "position"),
            ("颜色", "colour"), ("形状", "shape"), ("问答总体", "qa"), ("  问数量", "qa_count"),
            ("  问颜色", "qa_colour"), ("  问形状", "qa_shape"), ("  问位置上的物体", "qa_object"),
            ("未见组合的物体", "heldout_objects"), ("两图问答：哪张图（随机 50%）", "pairs"),
            ("两图问答：某张图里几个（随机 33%）", "pairs_count")]
    names = list(results)
    print(pad("指标", 36) + "".join(pad(n, 12) for n in names))
    for label, key in rows:
        cells = [pad(f"{results[n][key] * 100:.1f}%" if key in results[n] else "-", 12) for n in names]
        print(pad(label, 36) + "".join(cells))


@cli
def main(argv=None):
    from checkpoint import load_checkpoint
    from trainer import resolve_device
    p = ArgumentParser(description="评估检查点：默认在合成测试场景上测描述精确匹配率、各属性准确率和问答准确率；"
                                "给出 --data-path 或 --dataset-name 时改为在真实图片上算 BLEU-4 和 CIDEr-D")
    p.add_argument("--checkpoint", default="checkpoints/vision_trained_model.pt", help="模型文件（默认 checkpoints/vision_trained_model.pt）")
    p.add_argument("--scenes", type=int, default=200, help="每个测试集的场景数（默认 200）")
    p.add_argument("--seed", type=int, default=0, help="测试场景的随机种子（默认 0）")
    p.add_argument("--lang", default=None, choices=["zh", "en"], help="描述语言（默认取训练时的设置）")
    p.add_argument("--device", default="auto", help="设备：auto / cpu / cuda（默认 auto）")
    p.add_argument("--json", help="把结果另存为 JSON 文件")
    p.add_argument("--pairs", type=int, default=0,
                   help="另测这么多对图的两图问题（“哪张图里有红色的圆形？”随机猜对 50%%；“第一张图里有几个形状？”"
                        "每对两张各问一次，随机猜对 33%%），用于在 scenes.py --format llava 导出的数据上训练的模型（默认 0，不测）")
    real = p.add_argument_group("真实图片评估（BLEU-4 / CIDEr-D）")
    real.add_argument("--data-path", help="本地数据文件夹（images/ + captions.json 或 metadata.jsonl）")
    real.add_argument("--dataset-name", help="Hugging Face 数据集名或本地副本路径")
    real.add_argument("--split", default="test", help="数据集划分（默认 test）")
    real.add_argument("--image-column", help="图片列名（默认自动识别）")
    real.add_argument("--caption-column", help="描述列名，多个用逗号分隔（默认自动识别）")
    real.add_argument("--count", type=int, default=200, help="评估的图片数（默认 200）")
    a = p.parse_args(argv)
    if a.scenes <= 0 or a.count <= 0:
        raise UserError("--scenes 和 --count 必须是正整数。")
    if a.data_path or a.dataset_name:
        model, tok, _ = load_checkpoint(a.checkpoint, resolve_device(a.device))
        result = evaluate_real(a, model, tok)
        if a.json:
            with open(a.json, "w", encoding="utf-8") as f:
                json.dump(result, f, ensure_ascii=False, indent=1)
        return
    model, tok, meta = load_checkpoint(a.checkpoint, resolve_device(a.device))
    lang = a.lang or meta.get("lang", "zh")
    t = time.time()
    results = {"已见组合": evaluate_scenes(model, tok, a.scenes, "test", a.seed, lang),
               "未见组合": evaluate_scenes(model, tok, a.scenes, "heldout", a.seed, lang)}
    if a.pairs > 0:
        import scene_chats
        for name, split in (("已见组合", "test"), ("未见组合", "heldout")):
            results[name].update(scene_chats.score_pairs(model, tok, a.pairs, split, a.seed, lang))
    print_table(results)
    print(f"（{a.scenes} 个测试场景/组；用时 {time.time() - t:.1f} 秒）")
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(results, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    sys.exit(main())
