import pytest

import scenes

from tokenizer import IMAGE, Tokenizer


@pytest.mark.parametrize("text", ["左上方是一个红色的圆形。", "A red circle at the top left.",
                                  "emoji 🙂🐱👍🏽 and 混合 text ©", "生僻字：龘靐齉", "  spaces\tand\nlines  "])
def test_round_trips_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_only_declared_words_merge_and_a_colour_stays_apart_from_a_shape(tok):
    """The fixture's tokenizer was trained with the demo's words: each is one token, a colour and
    a shape are always two tokens (an unseen pair is two known tokens), other CJK characters stay
    one token each, and every demo sentence splits exactly at its words."""
    import re
    pieces = lambda t: [tok.decode([i]) for i in tok.encode(t)]
    assert pieces("左上方是一个红色的三角形") == ["左上方", "是一个", "红色", "的", "三角形"]
    assert pieces("有的是红") == ["有", "的", "是", "红"]     # characters outside the words stay alone
    for c in scenes.COLOURS_ZH.values():
        for s in scenes.SHAPES_ZH.values():
            assert tok.encode(f"{c}的{s}") == tok.encode(c) + tok.encode("的") + tok.encode(s)
    words = sorted(scenes.words("zh"), key=len, reverse=True)
    split = re.compile("|".join(words) + "|.")
    for text in scenes.all_texts("zh")[:3000]:
        assert pieces(text) == split.findall(text), text
    plain = Tokenizer.train(["红色的三角形。"] * 10, vocab_size=300)
    assert len(plain.encode("红色的三角形")) == 6            # no words declared: every character alone


def test_special_tokens_in_user_text_are_plain_text(tok):
    ids = tok.encode("</s><image><pad>")
    assert tok.eos_id not in ids and tok.image_id not in ids and tok.pad_id not in ids
    assert tok.decode(ids) == "</s><image><pad>"


def test_chat_template_marks_only_answers(tok):
    msgs = [{"role": "user", "content": "图里有什么？"}, {"role": "assistant", "content": "一个圆形。"},
            {"role": "user", "content": "什么颜色？"}, {"role": "assistant", "content": "红色。"}]
    ids, labels = tok.encode_chat(msgs, image_tokens=4, n_images=1)
    assert ids[:2] == [tok.bos_id, tok.user_id] and ids[2:6] == [tok.image_id] * 4
    answers = [l for l in labels if l != -100]
    assert answers == tok.encode("一个圆形。") + [tok.eos_id] + tok.encode("红色。") + [tok.eos_id]
    gen, _ = tok.encode_chat(msgs[:1], 4, 1, add_generation_prompt=True)
    assert gen[-1] == tok.assistant_id and gen == ids[:len(gen)]


def test_image_marker_position_and_count(tok):
    ids, _ = tok.encode_chat([{"role": "user", "content": f"看{IMAGE}这个"}], 3, 1)
    assert ids[2:] == [tok.image_id] * 3 + tok.encode("看 这个")      # images move in front of the words
    with pytest.raises(ValueError):
        tok.encode_chat([{"role": "user", "content": f"{IMAGE}{IMAGE}"}], 3, 1)


def test_serialises_inside_a_string(tok):
    again = Tokenizer.from_str(tok.to_str())
    assert again.encode("你好 world") == tok.encode("你好 world")
    assert again.eos_id == tok.eos_id


def test_text_before_image_encodes_like_image_first(tok):
    """Most OpenAI clients send the text part first; the built-in template puts a turn's images
    first, as in training, so the model sees the same tokens either way."""
    def ids(content, n=1):
        return tok.encode_chat([{"role": "user", "content": content}], 9, n, add_generation_prompt=True)[0]
    assert ids("描述这张图片<image>") == ids("<image>描述这张图片") == ids("描述这张图片")
    assert ids("描述这张图片\n<image>") == ids("<image>描述这张图片")
    assert ids("Describe <image> please") == ids("<image>Describe please")
    assert ids("两张图<image><image>哪个有红色？", 2) == ids("<image><image>两张图 哪个有红色？", 2)


def test_several_images_are_named_in_front_and_named_turns_keep_their_order(tok):
    """A small language model cannot tell which of two runs of image tokens came first; the template
    names each picture in front of it, as multi-image models are prompted ("Picture 1: <img>"). A
    turn whose words already stand between its images keeps its order."""
    def ids(content, n=2):
        return tok.encode_chat([{"role": "user", "content": content}], 9, n, add_generation_prompt=True)[0]
    named = ids("图1：<image>图2：<image>哪张图里有红色的圆形？")
    assert ids("<image><image>哪张图里有红色的圆形？") == ids("哪张图里有红色的圆形？<image><image>") == named
    assert ids("哪张图里有红色的圆形？") == named                    # images without markers go first too
    first = named.index(tok.image_id)
    second = named.index(tok.image_id, first + 9)
    assert named[first - len(tok.encode("图1：")):first] == tok.encode("图1：")
    assert named[second - len(tok.encode("图2：")):second] == tok.encode("图2：")
    assert named[first:first + 9] == named[second:second + 9] == [tok.image_id] * 9
    assert ids("左边<image>和右边<image>哪个是红色？") == tok.encode_chat([], 9, 0)[0] + [tok.user_id] + \
        tok.encode("左边") + [tok.image_id] * 9 + tok.encode("和右边") + [tok.image_id] * 9 + tok.encode("哪个是红色？") + \
        [tok.assistant_id]
    one = [tok.bos_id, tok.user_id] + [tok.image_id] * 9 + tok.encode("描述") + [tok.assistant_id]
    assert ids("<image>描述", 1) == ids("描述<image>", 1) == one          # one image: no name


def test_splits_like_gpt2_and_no_merge_joins_a_cjk_character(tok):
    """The trained tokenizer splits text with GPT-2's pre-tokenizer alone (llama.cpp's "gpt-2",
    so a GGUF export tokenizes as we do); CJK characters stay whole, and merge only inside a
    declared word."""
    import json
    from tokenizer import joins_cjk, token_bytes
    spec = json.loads(tok.to_str())
    assert spec["pre_tokenizer"] == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    joined = [[token_bytes(t).decode() for t in m] for m in spec["model"]["merges"] if joins_cjk(*map(token_bytes, m))]
    assert joined and all(any(w.startswith(a + b) for w in scenes.words("zh")) for a, b in joined)     # whole characters
    assert len(set(spec["model"]["vocab"].values())) == len(spec["model"]["vocab"]) == tok.vocab_size
    assert [tok.decode([i]) for i in tok.encode(" 红色的")] == [" ", "红色", "的"]
    assert joins_cjk("红".encode(), "色".encode()) and joins_cjk(b" ", "红".encode()[:1])
    assert not joins_cjk(b"a", b"b") and not joins_cjk("红".encode()[:1], "红".encode()[1:])


def test_kept_encodings_are_bounded_and_equal_fresh_ones(tok, monkeypatch):
    """Tokenizer.encode keeps short texts' ids (training texts repeat every epoch); a server's
    tokenizer sees any text, so what is kept is bounded in count and in length."""
    monkeypatch.setattr(Tokenizer, "KNOWN_TEXTS", 3)
    t = Tokenizer.from_str(tok.to_str())
    long = "一个红色的圆形" * 40
    texts = ["红色", "圆形在左边", long, "图中有两个形状", "蓝色的方形", "红色"]
    got = [t.encode(x) for x in texts]
    assert got == [tok.tok.encode(x, add_special_tokens=False).ids for x in texts]
    assert list(t.known) == ["红色", "圆形在左边", "图中有两个形状"]      # the long one never, then full
    got[0].append(0)
    assert t.encode("红色") == got[-1]                                   # callers get copies
