"""The batching engine on its own (no HTTP): batched answers equal one-at-a-time answers."""
import threading
import time

import pytest
import torch

from images import to_tensor as image_to_tensor
from engine import Engine, Job, QueueFull
from model import VLM
from scenes import make_scene, render
from tests.conftest import tiny_config


def prompt(tok, model, text, with_image=True):
    ids, _ = tok.encode_chat([{"role": "user", "content": text}], model.cfg.image_tokens,
                             int(with_image), add_generation_prompt=True)
    return ids


def image(model, i):
    objs, rng = make_scene(0, "test", i)
    return image_to_tensor(render(objs, rng, model.cfg.vit_image_size), model.cfg)[None]


def reference(model, ids, pixels, n, stop):
    """model.generate on a single prompt, cut at the first stop token."""
    out = []
    for col in model.generate(torch.tensor([ids]), pixels, max_new_tokens=n, stop_ids=stop):
        t = int(col[0])
        if t in stop:
            break
        out.append(t)
    return out


class Collect:
    """publish() target: records events, wakes waiters when jobs finish."""

    def __init__(self):
        self.events, self.done = [], threading.Event()
        self.cv = threading.Condition()

    def __call__(self, events):
        with self.cv:
            self.events += events
            self.cv.notify_all()

    def wait(self, jobs, timeout=30):
        end = time.monotonic() + timeout
        with self.cv:
            while not all(j.finish_reason for j in jobs):
                assert self.cv.wait(end - time.monotonic()), "jobs did not finish"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)             # what the server uses on this 2-core machine; much faster here
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model(tok, one_thread):
    torch.manual_seed(0)
    return VLM(tiny_config(tok)).eval()


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from tests.tiny_hf import save_llama, save_qwen2
    d = tmp_path_factory.mktemp("hf")
    return {"llama": save_llama(d / "llama", head_dim=16), "qwen2": save_qwen2(d / "qwen2")}


@pytest.fixture(params=["built-in", "llama", "qwen2"])
def any_lm(request, tok, one_thread):
    """(model, tokenizer): the built-in language model, or a tiny Hugging Face one behind a new
    built-in ViT: a Llama whose head_dim (16) is not hidden_size / heads (8), or a Qwen2-style
    one (q/k/v biases, tied embeddings)."""
    torch.manual_seed(0)
    if request.param == "built-in":
        return VLM(tiny_config(tok)).eval(), tok
    from backbones import build_vlm
    from model import VLMConfig
    model, hf_tok = build_vlm(lm_source=str(request.getfixturevalue("hf_folders")[request.param]),
                              scratch_cfg=VLMConfig(vit_image_size=16, vit_patch_size=4, vit_dim=32, vit_layers=1,
                                                    vit_heads=2))
    return model.eval(), hf_tok


def test_batched_equals_one_at_a_time(any_lm):
    """Eight requests of mixed prompt lengths, with and without images, different max_new_tokens:
    the later ones arrive in pairs while the first is mid-answer, so each pair is prefilled as one
    left-padded batch and joins the running one (short answers leave it early). Every answer
    matches generate() on that request alone."""
    model, tok = any_lm
    stop = {tok.eos_id} | ({tok.user_id} if hasattr(tok, "user_id") else set())
    specs = [("描述这张图片", True, 40), ("图里有几个形状？", True, 5), ("hello there, what is this", False, 30),
             ("红色", True, 1), ("一个很长的问题，" * 6, True, 25), ("左上角是什么颜色", True, 18),
             ("What is in the picture?", False, 12), ("two blue squares", True, 9)]
    jobs_in = [(prompt(tok, model, text, img), image(model, i) if img else None, n)
               for i, (text, img, n) in enumerate(specs)]
    expected = [reference(model, ids, px, n, stop) for ids, px, n in jobs_in]
    assert len(expected[0]) >= len(specs)              # the first runs while all others arrive
    sink = Collect()
    engine = Engine(model, stop, max_batch=8, max_queue=8, publish=sink).start()
    # expected came from the usual (out, in) weights; the engine decodes from the transposed layout
    linear = next(m for m in model.lm.modules() if isinstance(m, torch.nn.Linear))
    assert linear.weight.stride() == (1, linear.out_features)
    jobs = [Job(ids, px, max_new_tokens=n, stream=True) for ids, px, n in jobs_in]
    streamed = lambda job: [v for j, kind, v in sink.events if j is job and kind == "token"]
    try:
        engine.submit(jobs[0])
        for k in range(1, len(jobs), 2):               # two more every two tokens of the first
            with sink.cv:
                assert sink.cv.wait_for(lambda: len(streamed(jobs[0])) >= k, timeout=30)
            with engine.cv:                            # both wait, so they prefill as one padded batch
                for job in jobs[k:k + 2]:
                    engine.submit(job)
        sink.wait(jobs)
    finally:
        engine.close()
    for job, want, (_, _, n) in zip(jobs, expected, jobs_in):
        assert job.tokens == want
        assert job.finish_reason == ("length" if len(want) == n else "stop")
        assert streamed(job) == job.tokens
    assert all(jobs[0].t_first < job.t_start < jobs[0].t_end for job in jobs[1:])   # joined mid-way
    assert all(jobs[k].t_start == jobs[k + 1].t_start for k in (1, 3, 5))           # prefilled in pairs
    stats = engine.snapshot()
    assert stats["completed"] == len(specs)
    assert stats["mean_batch"] > 2.0                   # rows really shared decode steps


def test_jobs_with_several_images_share_one_prefill(model, tok):
    """Jobs holding 0, 1, 2 and 3 images (one with an image in an earlier turn of its history)
    prefill together, and one more comes later: each answer equals generate() on it alone."""
    stop = {tok.eos_id, tok.user_id}
    turns = lambda *texts: [{"role": r, "content": t} for r, t in zip(("user", "assistant") * 3, texts)]
    specs = [(turns("描述这张图片"), 0), (turns("左上角是什么颜色"), 1), (turns("哪张图里有圆形？"), 2),
             (turns("<image>图里有什么？", "一个红色的圆形。", "<image>这张呢？<image>"), 3), (turns("红色"), 2)]
    jobs_in = [(tok.encode_chat(m, model.cfg.image_tokens, k, add_generation_prompt=True)[0],
                torch.cat([image(model, i + j) for j in range(k)]) if k else None) for i, (m, k) in enumerate(specs)]
    expected = [reference(model, ids, px, 20, stop) for ids, px in jobs_in]
    sink = Collect()
    engine = Engine(model, stop, max_batch=8, publish=sink)
    jobs = [Job(ids, px, max_new_tokens=20) for ids, px in jobs_in]
    for j in jobs[:4]:                                 # engine not started: these four prefill as one batch
        engine.submit(j)
    engine.start()
    try:
        with sink.cv:
            sink.cv.wait_for(lambda: engine.snapshot().get("steps", 0) > 0, timeout=30)
        engine.submit(jobs[4])
        sink.wait(jobs)
    finally:
        engine.close()
    assert [j.tokens for j in jobs] == expected and all(expected)
    assert len({j.t_start for j in jobs[:4]}) == 1 and jobs[4].t_start > jobs[0].t_start


def test_sampling_is_reproducible_per_seed(model, tok):
    ids = prompt(tok, model, "描述这张图片")
    sink = Collect()
    engine = Engine(model, {tok.eos_id}, publish=sink).start()
    try:
        jobs = [Job(ids, image(model, 0), max_new_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=s)
                for s in (7, 7, 8)]
        for j in jobs:
            engine.submit(j)
        sink.wait(jobs)
    finally:
        engine.close()
    assert jobs[0].tokens == jobs[1].tokens
    assert jobs[0].tokens != jobs[2].tokens


def test_queue_limit_cancel_and_time_limit(model, tok):
    """Past max_batch + max_queue, submit() refuses; a cancelled job leaves the batch at once;
    a job past its time limit ends with finish_reason time_limit."""
    with torch.no_grad():                              # never stop on EOS: long answers on demand
        model.lm.embed.weight[tok.eos_id] = 0
    ids = prompt(tok, model, "描述这张图片", with_image=False)
    sink = Collect()
    engine = Engine(model, {tok.eos_id}, max_batch=2, max_queue=1, publish=sink)
    long = [Job(ids, max_new_tokens=200) for _ in range(3)]
    for j in long:                                     # engine not started yet: all three wait
        engine.submit(j)
    with pytest.raises(QueueFull):
        engine.submit(Job(ids, max_new_tokens=5))
    slow = Job(ids, max_new_tokens=200, timeout=0.0)   # already expired when admitted
    long[2].cancel()
    engine.start()
    try:
        sink.wait(long[2:])
        assert long[2].finish_reason == "cancelled" and long[2].tokens == []
        long[0].cancel()
        sink.wait(long[:2])
        assert long[0].finish_reason == "cancelled" and len(long[0].tokens) < 200
        assert long[1].finish_reason == "length" and len(long[1].tokens) == 200
        engine.submit(slow)
        sink.wait([slow])
        assert slow.finish_reason in ("queue_timeout", "time_limit")
    finally:
        engine.close()
    stats = engine.snapshot()
    assert stats["rejected"] == 1 and stats["cancelled"] == 2 and stats["active"] == 0


def test_a_failing_step_fails_its_jobs_and_the_engine_keeps_serving(model, tok):
    ids = prompt(tok, model, "描述这张图片", with_image=False)
    sink = Collect()
    engine = Engine(model, {tok.eos_id}, publish=sink).start()
    real = model.lm.forward

    def broken(x, *args, **kwargs):
        if x.shape[1] == 1:                          # decode steps fail, prefill works
            raise RuntimeError("simulated device failure")
        return real(x, *args, **kwargs)
    try:
        model.lm.forward = broken
        failed = Job(ids, max_new_tokens=5)
        engine.submit(failed)
        sink.wait([failed])
        model.lm.forward = real
        ok = Job(ids, max_new_tokens=5)
        engine.submit(ok)
        sink.wait([ok])
    finally:
        model.lm.forward = real
        engine.close()
    assert failed.finish_reason == "error"
    assert ok.finish_reason == "length" and len(ok.tokens) == 5


def test_a_bad_new_job_fails_alone(model, tok):
    """A job whose prefill fails (here: image tokens but no image) ends with 'error'; the jobs
    already decoding go on untouched."""
    ids = prompt(tok, model, "描述这张图片", with_image=False)
    sink = Collect()
    engine = Engine(model, {tok.eos_id}, publish=sink).start()
    try:
        running = Job(ids, max_new_tokens=150, stream=True)
        engine.submit(running)
        with sink.cv:
            sink.cv.wait_for(lambda: any(j is running for j, _, _ in sink.events), timeout=30)
        bad = Job(prompt(tok, model, "描述这张图片", with_image=True), pixels=None, max_new_tokens=5)
        engine.submit(bad)
        sink.wait([bad, running])
    finally:
        engine.close()
    assert bad.finish_reason == "error"
    assert running.finish_reason in ("length", "stop") and running.t_end > bad.t_end
    assert running.tokens == reference(model, ids, None, 150, {tok.eos_id})


def test_a_sliding_window_llm_keeps_its_window_in_the_stacked_cache(one_thread):
    """hf_cache keeps every column (so layers stack); transformers still masks by the window from
    the config, in cache columns, which left padding shifts alike for query and keys. Decoding a
    left-padded prompt of a Mistral with a 4-token window equals its full forward without cache."""
    from transformers import MistralConfig, MistralForCausalLM
    from backbones import HFLanguageModel
    from layout import positions_and_mask
    torch.manual_seed(0)
    lm = HFLanguageModel(MistralForCausalLM(MistralConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, attn_implementation="sdpa")).eval(), "mistral")
    ids = torch.randint(3, 100, (1, 12))
    with torch.inference_mode():
        want = lm.logits(lm(lm.embed(ids), torch.arange(12)[None]))[0, 8:]
        am = torch.tensor([[0, 0, 0] + [1] * 9])                 # 3 pad columns on the left
        positions, mask = positions_and_mask(am, (1, 12))
        cache = lm.new_cache(1, 12)
        h = lm(lm.embed(torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:, :9]], 1)), positions, mask, cache)
        got, key_mask = [lm.logits(h[0, -1])], am.bool()
        for t in (9, 10, 11):
            key_mask = torch.cat([key_mask, key_mask.new_ones(1, 1)], 1)
            cache = cache.from_stacked(*cache.stacked())          # as after a merge or a cut
            got.append(lm.logits(lm(lm.embed(ids[:, t:t + 1]), torch.tensor([[t]]), key_mask[:, None, None, :],
                                    cache)[0, -1]))
    assert torch.allclose(torch.stack(got), want, atol=1e-5)
    lm.hf_model.config.sliding_window = None
    windowless = lm.logits(lm(lm.embed(ids), torch.arange(12)[None]))[0, 8:]
    assert not torch.allclose(windowless, want, atol=1e-3)              # the window matters here
