"""Conversation data (conversations.py): LLaVA JSON, messages JSONL and HF conversation columns,
the labels each gets under the built-in template and a Qwen2-style ChatML template (token by
token), the context rule, problems named by sample id, --check-data, and the scenes' LLaVA export."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, Image as HFImage, List

import conversations
import scene_chats
import scenes
import sources
from captions import Mixture
from checkpoint import load_checkpoint
from test_captions import encode, photo
from test_train_real import guide_folder, main
from tiny_hf import CHATML_TEMPLATE, _bpe
from tokenizer import IMAGE, ChatTemplateTokenizer, Tokenizer, kept_length

ROOT = Path(__file__).resolve().parent.parent
T = 4                                               # image tokens per image in these tests


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["图里有什么？", "红色的圆形。", "几个？", "一个。", "你是助手。", "哪张？", "第一张。",
                            "What is this?", "A red circle."] * 5, vocab_size=320)


@pytest.fixture(scope="module")
def qwen():
    """A tiny Qwen2-style tokenizer: byte-level BPE, ChatML specials, <image> added, its template."""
    from transformers import PreTrainedTokenizerFast
    hf = PreTrainedTokenizerFast(tokenizer_object=_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
                                 eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.add_special_tokens({"additional_special_tokens": [IMAGE]})
    hf.chat_template = CHATML_TEMPLATE
    return ChatTemplateTokenizer(hf)


LLAVA = [
    {"id": "two-turns", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\n图里有什么？"}, {"from": "gpt", "value": "红色的圆形。"},
        {"from": "human", "value": "几个？"}, {"from": "gpt", "value": "一个。"}]},
    {"id": "two-images", "image": ["a.png", "b.png"], "conversations": [
        {"from": "system", "value": "你是助手。"},
        {"from": "human", "value": "<image>\n<image>\n哪张？"}, {"from": "gpt", "value": "第一张。"}]},
    {"id": "text-only", "conversations": [{"from": "human", "value": "几个？"}, {"from": "gpt", "value": "一个。"}]},
]
BROKEN = [
    {"id": "too-many-marks", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image><image>哪张？"}, {"from": "gpt", "value": "第一张。"}]},
    {"id": "no-file", "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>图里有什么？"}, {"from": "gpt", "value": "红色。"}]},
    {"id": "empty-answer", "conversations": [{"from": "human", "value": "几个？"}, {"from": "gpt", "value": " "}]},
    {"id": "no-answer", "conversations": [{"from": "human", "value": "几个？"}]},
    {"id": "odd-role", "conversations": [{"from": "robot", "value": "几个？"}, {"from": "gpt", "value": "一个。"}]},
]


def llava_folder(root: Path, records=LLAVA) -> Path:
    (root / "images").mkdir(parents=True)
    for i, name in enumerate(("a.png", "b.png")):
        photo((40, 30), seed=i).save(root / "images" / name)
    (root / "chat.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return root


def as_messages(rec) -> dict:
    """The same sample in the messages layout (LLaMA-Factory / ms-swift)."""
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    images = rec.get("image", [])
    return {"id": rec["id"], "messages": [{"role": roles[t["from"]], "content": t["value"]} for t in rec["conversations"]],
            "images": [images] if isinstance(images, str) else images}


def messages_file(root: Path) -> Path:
    llava_folder(root, [])
    f = root / "train.jsonl"
    f.write_text("".join(json.dumps(as_messages(r), ensure_ascii=False) + "\n" for r in LLAVA), encoding="utf-8")
    (root / "chat.json").unlink()
    return f


def hf_table(messages_layout: bool) -> Dataset:
    """The same samples as HF columns: messages + images (a list of Image), or conversations +
    image (one Image, None for text-only) -- the second layout cannot hold two images."""
    pics = [{"bytes": encode(photo((40, 30), seed=i), "PNG"), "path": None} for i in range(2)]
    if messages_layout:
        rows = [as_messages(r) for r in LLAVA]
        for r in rows:
            r["images"] = [pics[["a.png", "b.png"].index(p)] for p in r["images"]]
        return Dataset.from_list(rows).cast_column("images", List(HFImage()))
    rows = [{"id": r["id"], "conversations": r["conversations"], "image": pics[0] if "image" in r else None}
            for r in LLAVA if r["id"] != "two-images"]
    return Dataset.from_list(rows).cast_column("image", HFImage())


def read(name: str, source: str = "local"):
    return sources.read(source, name, sources.Options(workers=1))


# ----------------------------------------------------------------------------- labels, token by token

def builtin_expected(tok, sample_id: str):
    """(ids, labels) written out by hand for the built-in template."""
    user, asst, eos, img = tok.user_id, tok.assistant_id, tok.eos_id, tok.image_id
    q = [-100]
    if sample_id == "two-turns":
        parts = [([tok.bos_id, user] + [img] * T + tok.encode("图里有什么？") + [asst], False),
                 (tok.encode("红色的圆形。") + [eos], True), ([user] + tok.encode("几个？") + [asst], False),
                 (tok.encode("一个。") + [eos], True)]
    elif sample_id == "two-images":                 # no place for the system turn; each picture named
        parts = [([tok.bos_id, user] + tok.encode("图1：") + [img] * T + tok.encode("图2：") + [img] * T +
                  tok.encode("哪张？") + [asst], False),
                 (tok.encode("第一张。") + [eos], True)]
    else:
        parts = [([tok.bos_id, user] + tok.encode("几个？") + [asst], False), (tok.encode("一个。") + [eos], True)]
    ids = [i for p, _ in parts for i in p]
    labels = [i if learnt else q[0] for p, learnt in parts for i in p]
    return ids, labels


def chatml_expected(qwen, sample_id: str):
    """(ids, labels) for ChatML, piece by piece: only each answer and its <|im_end|> learnt."""
    e, img, end = qwen.encode, qwen.image_id, qwen.eos_id
    sys_default = e("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    if sample_id == "two-turns":
        parts = [(sys_default + e("<|im_start|>user\n") + [img] * T + e("图里有什么？<|im_end|>\n<|im_start|>assistant\n"), False),
                 (e("红色的圆形。") + [end], True),
                 (e("\n<|im_start|>user\n几个？<|im_end|>\n<|im_start|>assistant\n"), False),
                 (e("一个。") + [end], True), (e("\n"), False)]
    elif sample_id == "two-images":                                  # the sample's own system turn
        parts = [(e("<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n") + [img] * 2 * T +
                  e("哪张？<|im_end|>\n<|im_start|>assistant\n"), False), (e("第一张。") + [end], True), (e("\n"), False)]
    else:
        parts = [(sys_default + e("<|im_start|>user\n几个？<|im_end|>\n<|im_start|>assistant\n"), False),
                 (e("一个。") + [end], True), (e("\n"), False)]
    return [i for p, _ in parts for i in p], [i if learnt else -100 for p, learnt in parts for i in p]


def loaded_samples(tmp_path, layout: str):
    """Every sample of one layout as the trainer would encode it: [(id, n_images, messages)]."""
    if layout == "llava":
        part = conversations.ChatSet(conversations.load_files(str(llava_folder(tmp_path / "d"))), 32)
    elif layout == "messages":
        part = conversations.ChatSet(conversations.load_files(str(messages_file(tmp_path / "d"))), 32)
    else:
        hf_table(True).save_to_disk(str(tmp_path / "hf"))
        part, _ = read(str(tmp_path / "hf"), "huggingface").parts(32)
    return [part.chat(k) for k in range(len(part))]


@pytest.mark.parametrize("layout", ["llava", "messages", "hf"])
def test_only_answers_and_their_end_of_turn_are_learnt(tmp_path, tok, qwen, layout):
    samples = loaded_samples(tmp_path, layout)
    assert sorted(s[0] for s in samples) == ["text-only", "two-images", "two-turns"]
    for sid, n, messages in samples:
        assert n == {"two-turns": 1, "two-images": 2, "text-only": 0}[sid]
        for t, expected in ((tok, builtin_expected(tok, sid)), (qwen, chatml_expected(qwen, sid))):
            ids, labels = t.encode_chat(messages, T, n)
            assert (ids, labels) == expected, (sid, type(t).__name__)
    learnt = [i for i, l in zip(*qwen.encode_chat(samples[0][2], T, samples[0][1])) if l != -100]
    assert qwen.hf.decode(learnt) in ("红色的圆形。<|im_end|>一个。<|im_end|>", "第一张。<|im_end|>", "一个。<|im_end|>")


# ----------------------------------------------------------------------------- reading

def test_problems_are_named_by_sample_and_good_samples_kept(tmp_path):
    chats = conversations.load_files(str(llava_folder(tmp_path / "d", LLAVA + BROKEN)))
    assert chats.ids == ["two-turns", "two-images", "text-only"] and chats.total == 8
    why = dict(p.split("：", 1) for p in chats.problems)
    assert why == {"样本 too-many-marks": "有 2 个 <image> 占位符，却有 1 张图片", "样本 no-file": "找不到图片 gone.png",
                   "样本 empty-answer": "第 2 轮是空回答",
                   "样本 no-answer": "没有回答轮（gpt / assistant），没有可训练的内容",
                   "样本 odd-role": "第 1 轮的角色 'robot' 不认识（只认 human/gpt、user/assistant、system）"}
    assert chats.images == [[0], [0, 1], []]                         # a.png is read once for both samples
    with pytest.raises(sources.UserError, match="5/8 条样本有问题.*too-many-marks"):
        read(str(tmp_path / "d")).parts(32)


def test_hf_columns_conversations_and_one_image(tmp_path):
    DatasetDict({"train": hf_table(False)}).save_to_disk(str(tmp_path / "hf"))
    source = read(str(tmp_path / "hf"), "huggingface")
    assert isinstance(source, sources.ChatTable)
    part, _ = source.parts(32)
    items = {part[(0, k)]["id"]: part[(0, k)] for k in range(len(part))}
    assert len(items["two-turns"]["images"]) == 1 and items["two-turns"]["images"][0].size == (32, 32)
    assert items["text-only"]["images"] == [] and items["two-turns"]["messages"][0]["content"] == "<image>图里有什么？"


def test_hf_columns_messages_and_a_list_of_paths_in_a_parquet_copy(tmp_path):
    root = llava_folder(tmp_path / "pq", [])
    rows = [as_messages(r) for r in LLAVA]
    for r in rows:
        r["images"] = [f"images/{p}" for p in r["images"]]
    Dataset.from_list(rows).to_parquet(str(root / "train.parquet"))
    part, _ = read(str(root / "train.parquet"), "huggingface").parts(32)
    items = {part[(0, k)]["id"]: part[(0, k)] for k in range(len(part))}
    assert [len(items[i]["images"]) for i in ("two-turns", "two-images", "text-only")] == [1, 2, 0]
    assert items["two-images"]["images"][1].getpixel((5, 5)) != items["two-images"]["images"][0].getpixel((5, 5))


def test_chats_mix_with_captions(tmp_path, tok):
    folder = guide_folder(tmp_path / "caps", 6)
    data = sources.Sources([read(str(folder)), read(str(llava_folder(tmp_path / "chat")))], sources.Options(val_ratio=0))
    mixed = data.training_data(32, sources.Limit(tok, T, 64)).train
    assert isinstance(mixed, Mixture) and len(mixed) == 9
    kinds = sorted("images" in mixed[(0, i)] for i in range(len(mixed)))
    assert kinds == [False] * 6 + [True] * 3


# ----------------------------------------------------------------------------- the context

def test_too_long_sample_is_dropped_never_cut_inside_its_image(tmp_path, tok):
    long_question = {"id": "long-question", "image": "a.png", "conversations": [
        {"from": "human", "value": "图里有什么？" * 8 + "<image>"}, {"from": "gpt", "value": "一个。"}]}
    long_answer = {"id": "long-answer", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>图里有什么？"}, {"from": "gpt", "value": "红色的圆形。" * 12}]}
    chats = conversations.load_files(str(llava_folder(tmp_path / "d", LLAVA + [long_question, long_answer])))
    part = conversations.ChatSet(chats, 32)
    fitted = part.fit(tok, T, 30)
    kept = [fitted.chat(k)[0] for k in range(len(fitted))]
    assert kept == ["two-turns", "two-images", "text-only", "long-answer"]
    assert len(fitted.too_long) == 1 and fitted.too_long[0].startswith("样本 long-question：")
    for k in range(len(fitted)):                     # what is kept fits, its image tokens whole, something learnt
        sid, n, messages = fitted.chat(k)
        ids, labels = tok.encode_chat(messages, T, n)
        keep = kept_length(ids, labels, tok.image_id, 30)
        assert keep <= 30 and ids[:keep].count(tok.image_id) == n * T and any(l != -100 for l in labels[:keep])


def test_kept_length_rule():
    img = 9
    assert kept_length([1, img, img, 2, 3], [-100, -100, -100, 2, 3], img, 10) == 5
    assert kept_length([1, img, img, 2, 3], [-100, -100, -100, 2, 3], img, 4) == 4      # answer text cut
    assert kept_length([1, 2, img, img, 3], [-100, -100, -100, -100, 3], img, 3) is None  # inside the image
    assert kept_length([1, img, 2, 3, 4], [-100, -100, -100, -100, 4], img, 4) is None    # nothing learnt left
    assert kept_length([1, 2], [-100, -100], img, 10) is None                            # nothing learnt at all


# ----------------------------------------------------------------------------- --check-data

def test_check_data_names_every_problem_and_fails(tmp_path):
    data = llava_folder(tmp_path / "d", LLAVA + BROKEN)
    r = subprocess.run([sys.executable, str(ROOT / "train_vision_real.py"), "--data-path", str(data), "--check-data",
                        "--preset", "micro", "--workers", "0", "--output", str(tmp_path / "m.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1, r.stderr
    for sid in ("too-many-marks", "no-file", "empty-answer", "no-answer", "odd-role"):
        assert f"  样本 {sid}：" in r.stdout
    assert "发现 5 个问题" in r.stdout and "【" in r.stdout and not (tmp_path / "m.pt").exists()


def test_check_data_on_good_data_exits_0_and_shows_the_learnt_spans(tmp_path, capsys):
    data = llava_folder(tmp_path / "d")
    code, out, _ = main(["--data-path", str(data), "--check-data", "--preset", "micro", "--workers", "0",
                         "--output", str(tmp_path / "m.pt")], capsys)
    assert code == 0, out
    assert "【红色的圆形。</s>】<|user|>几个？<|assistant|>【一个。</s>】" in out
    assert "<s><|user|>图1：<image>×16图2：<image>×16哪张？" in out      # micro: 16 tokens per image, two named
    assert "样本 3 条，图片 3 张（不同的 2 张），回答 4 轮，纯文字样本 1 条，带 system 轮的 1 条（内置模板没有 system 位置" in out
    assert "没有发现问题" in out and not (tmp_path / "m.pt").exists()


def test_check_data_counts_samples_the_context_cannot_hold(tmp_path, capsys):
    long = {"id": "long", "image": "a.png", "conversations": [
        {"from": "human", "value": "图里有什么？" * 200 + "<image>"}, {"from": "gpt", "value": "一个。"}]}
    data = llava_folder(tmp_path / "d", LLAVA + [long])
    code, out, _ = main(["--data-path", str(data), "--check-data", "--preset", "micro", "--workers", "0"], capsys)
    assert code == 1 and "超过上下文 1 条" in out and "  样本 long：" in out and "切到图片 token" in out


# ----------------------------------------------------------------------------- the scenes as conversations

def test_scene_export_reads_back_with_true_two_image_answers(tmp_path):
    samples, texts = scene_chats.export(tmp_path / "s", 9, lang="zh", size=32)
    chats = conversations.load_files(str(tmp_path / "s"))
    assert not chats.problems and len(chats.ids) == len(samples) and chats.total == len(samples)
    pairs = [(i, m) for i, m in zip(chats.ids, chats.messages) if i.startswith("pair_")]
    assert pairs and all(len(m) == 6 for _, m in pairs)           # which picture and each one's count, any order
    openers = set()
    for sid, messages in pairs:
        k = int(sid.split("_")[1])
        first, second = scenes.make_scene(0, "train", k)[0], scenes.make_scene(0, "train", k + 1)[0]
        qa = {messages[j]["content"].removeprefix(IMAGE * 2): messages[j + 1]["content"] for j in (0, 2, 4)}
        assert messages[0]["content"].startswith(IMAGE * 2) and IMAGE not in "".join(qa)
        openers.add(messages[0]["content"][len(IMAGE * 2):][:3])
        (which, answer), = [(q, a) for q, a in qa.items() if q.startswith("哪张图里有")]
        thing = which.split("哪张图里有")[1].rstrip("？")
        has = [any(scenes.name(o, "zh") == thing for o in objs) for objs in (first, second)]
        k = has.index(True)
        assert has == [k == 0, k == 1] and answer == (       # picture 1 described and checked, picture 2, the verdict
            f"图1：{scenes.caption(first)}图1里{('有', '没有')[k]}{thing}。图2：{scenes.caption(second)}所以是{('第一张', '第二张')[k]}。")
        assert {q: a for q, a in qa.items() if q != which} == {
            "第一张图里有几个形状？": f"{scenes.COUNT_ZH[len(first)]}个。", "第二张图里有几个形状？": f"{scenes.COUNT_ZH[len(second)]}个。"}
    assert len(openers) > 1                                        # not always the same question first
    singles = [m for i, m in zip(chats.ids, chats.messages) if i.startswith("scene_")]
    assert len(singles) == 9 and all(len(m) == 2 * (1 + scene_chats.QUESTIONS) for m in singles)
    text = conversations.load_files(str(tmp_path / "s" / "text"))             # a folder of its own: mixed in by weight
    assert not text.problems and len(text.ids) == len(texts) > 9 * scene_chats.TEXT_PER_SCENE * 0.8
    for sid, messages in zip(text.ids, text.messages):  # two fresh scenes each, after the 9 rendered ones
        k = int(sid.split("_")[1])
        first, second = scenes.make_scene(0, "train", 9 + 2 * k)[0], scenes.make_scene(0, "train", 10 + 2 * k)[0]
        assert IMAGE not in "".join(m["content"] for m in messages) and 2 <= len(messages) <= 2 * scene_chats.TEXT_QUESTIONS
        assert messages[0]["content"].endswith(f"？图1：{scenes.caption(first)}")       # picture 1 alone is shown
        for user, reply in zip(messages[::2], messages[1::2]):
            thing = user["content"].split("？")[0].removeprefix("哪张图里有")
            has = [any(scenes.name(o, "zh") == thing for o in objs) for objs in (first, second)]
            assert has.count(True) == 1 and reply["content"] == f"图1里{('有', '没有')[has.index(True)]}{thing}。"
    replies = [m["content"] for ms in text.messages for m in ms[1::2]]
    assert 0.3 < sum("没有" in r for r in replies) / len(replies) < 0.7


def test_two_image_questions_are_balanced_and_answerable():
    items = scene_chats.pair_items(200, "test", size=16)
    firsts = sum(scene_chats.chosen(a, "zh") == 0 for _, _, a, _ in items)
    assert 70 < firsts < 130 and all(len(ims) == 2 for ims, _, _, _ in items)
    same = scenes.make_scene(0, "test", 0)[0]
    assert scene_chats.which_question(same, same, random.Random(0), "en") is None   # nothing tells them apart


def test_which_answer_is_scored_by_its_last_verdict():
    assert scene_chats.chosen("图1：…图2：…所以是第二张。", "zh") == 1
    assert scene_chats.chosen("第二张里没有，所以是第一张。", "zh") == 0
    assert scene_chats.chosen("图1：图中有一个形状。", "zh") is None
    assert scene_chats.chosen("Picture 1: ... So it is the first one.", "en") == 0


def test_scene_chats_train_and_score_end_to_end(tmp_path, capsys):
    """The LLaVA export of the scenes trains through train_vision_real.py (one-, two-image
    samples in the same batches) and evaluate.py --pairs scores the checkpoint against chance."""
    import evaluate
    samples, texts = scene_chats.export(tmp_path / "s", 12, size=32)
    out = tmp_path / "m.pt"
    code, text, err = main(["--data-path", str(tmp_path / "s"), "--data-path", f"{tmp_path / 's' / 'text'}:0.25",
                            "--preset", "micro", "--epochs", "1", "--batch-size", "8",
                            "--workers", "0", "--val-ratio", "0", "--output", str(out)], capsys)
    assert code == 0, err[-2000:]
    assert f"训练样本 {len(samples) + round(len(texts) / 4)} 条/轮" in text and out.exists()   # a different quarter each epoch
    tok = load_checkpoint(out)[1]                                  # the export's words.txt: one token per name
    assert [tok.decode([t]) for t in tok.encode("红色的圆形")] == ["红色", "的", "圆形"]
    evaluate.main(["--checkpoint", str(out), "--scenes", "2", "--pairs", "4", "--device", "cpu",
                   "--json", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    for split in ("已见组合", "未见组合"):
        assert result[split]["pairs_chance"] == 0.5 and result[split]["pairs"] in (0, 0.25, 0.5, 0.75, 1)
        assert result[split]["pairs_count_chance"] == pytest.approx(1 / 3) and result[split]["pairs_count"] * 8 % 1 == 0
    shown = capsys.readouterr().out
    assert "两图问答：哪张图（随机 50%）" in shown and "两图问答：某张图里几个（随机 33%）" in shown
