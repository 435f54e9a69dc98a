"""Export a checkpoint as GGUF for llama.cpp and Ollama.

    python export_gguf.py --checkpoint checkpoints/vision_trained_model.pt --output exported/gguf --quant q8_0
writes into the folder: model-<quant>.gguf (the language model), mmproj-<f16|q8_0>.gguf (vision
tower + projector), a Modelfile for `ollama create`, and README.md with the llama.cpp and Ollama
commands. The files themselves are gguf_export.py's work; this module is the command around it.
"""
from __future__ import annotations

import shutil
import sys

from errors import ArgumentParser, cli
from export_hf import add_io_flags, output_folder
from gguf_export import QUANTS, export

# Ollama renders with its own Go template (not the GGUF's Jinja one): the built-in chat format
# (tokenizer.py). Ollama puts a message's image tags in front of its text, as our template does;
# the BOS comes from the GGUF (add_bos_token), system messages have no place in it.
OLLAMA_TEMPLATE = ('{{- range .Messages }}{{- if eq .Role "user" }}<|user|>{{ .Content }}'
                   '{{- else if eq .Role "assistant" }}<|assistant|>{{ .Content }}</s>{{- end }}{{- end }}<|assistant|>')


def modelfile(model: str, mmproj: str, n_ctx: int) -> str:
    return (f"FROM ./{model}\nFROM ./{mmproj}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
            'PARAMETER stop "</s>"\nPARAMETER stop "<|user|>"\n'
            f"PARAMETER temperature 0\nPARAMETER num_ctx {n_ctx}\n")


def described(types: dict) -> str:
    """{"F16": 15, "F32": 5} -> "15 个 F16, 5 个 F32": how many tensors of each type a file holds."""
    return ", ".join(f"{n} 个 {t}" for t, n in sorted(types.items()))


def readme(model: str, mmproj: str, contents: dict) -> str:
    lines = "\n".join(f"- `{name}`：{described(types)}" for name, types in contents.items())
    return f"""# GGUF 导出

由 `export_gguf.py` 生成。文件（张量类型统计，即实际存储的精度）：

{lines}
- `Modelfile`：Ollama 用

## llama.cpp

```bash
# 命令行问答（--jinja：用 GGUF 里带的对话模板；--temp 0：贪心解码，与本工具 serve.py 默认一致）
llama-mtmd-cli -m {model} --mmproj {mmproj} --jinja --temp 0 --image 图片.png -p "描述这张图片。"

# OpenAI 兼容服务
llama-server -m {model} --mmproj {mmproj} --jinja --port 8080
IMG=$(base64 -w0 图片.png)
curl http://localhost:8080/v1/chat/completions -H 'Content-Type: application/json' -d '{{
  "temperature": 0, "max_tokens": 64,
  "messages": [{{"role": "user", "content": [
    {{"type": "image_url", "image_url": {{"url": "data:image/png;base64,'"$IMG"'"}}}},
    {{"type": "text", "text": "描述这张图片。"}}]}}]}}'
```

## Ollama

```bash
ollama create my-vlm -f Modelfile
ollama run my-vlm "描述这张图片。 ./图片.png"
```

非正方形的图片：llama.cpp 按 LLaVA-1.5 的方式保持长宽比、用灰色补成正方形，本工具是直接拉伸成正方形，
所以这类图片的答案可能与 `serve.py` 不同；正方形图片两边完全一致。
"""


def build_parser():
    p = ArgumentParser(description="把训练好的检查点导出为 GGUF（llama.cpp / Ollama 可直接加载）："
                                   "语言模型、视觉部分（mmproj）、Ollama 的 Modelfile 和使用说明。")
    add_io_flags(p)
    p.add_argument("--quant", default="f16", choices=QUANTS,
                   help="语言模型的精度 (默认: f16)；q8_0 约为 f16 的一半大，q4_k_m 约三成（需要 llama-cpp-python）")
    return p


@cli
def main(argv=None):
    from checkpoint import load_checkpoint
    a = build_parser().parse_args(argv)
    out = output_folder(a.output)
    model, tok, _ = load_checkpoint(a.checkpoint)
    existed = out.exists()
    try:
        contents = export(model.eval(), tok, out, a.quant)
    except BaseException:                       # leave no half-written export behind
        if existed:
            for p in out.iterdir():
                p.unlink()
        else:
            shutil.rmtree(out, ignore_errors=True)
        raise
    model_file, mmproj_file = contents
    (out / "Modelfile").write_text(modelfile(model_file, mmproj_file, model.cfg.lm_max_len), encoding="utf-8")
    (out / "README.md").write_text(readme(model_file, mmproj_file, contents), encoding="utf-8")
    for name, types in contents.items():
        size = (out / name).stat().st_size / 2 ** 20
        print(f"{name}：{size:.1f} MB，{described(types)}")
    print(f"已导出到 {out}：用法见 {out / 'README.md'}（llama-mtmd-cli / llama-server / ollama create）。")


if __name__ == "__main__":
    sys.exit(main())
