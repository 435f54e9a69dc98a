"""Shared fixtures: a tiny tokenizer and model built from configs (never downloaded)."""
import pytest
import torch

import scenes
from model import VLM, VLMConfig
from tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tok():
    return Tokenizer.train(scenes.all_texts("zh")[:3000] + scenes.all_texts("en")[:3000], vocab_size=600,
                           words=scenes.words("zh"))


def tiny_config(tok, **kw):
    cfg = dict(vit_image_size=16, vit_patch_size=4, vit_dim=32, vit_layers=2, vit_heads=2,
               lm_vocab_size=tok.vocab_size, lm_dim=32, lm_layers=2, lm_heads=4, lm_kv_heads=2,
               lm_hidden=64, lm_max_len=256, image_token_id=tok.image_id, pad_token_id=tok.pad_id,
               bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    cfg.update(kw)
    return VLMConfig(**cfg)


@pytest.fixture
def tiny(tok):
    torch.manual_seed(0)
    return VLM(tiny_config(tok)).eval()
