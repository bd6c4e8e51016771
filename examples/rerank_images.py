"""Rerank page images (and texts) against a query with a vision-language reranker:
jina-reranker-m0 or a Llama-Nemotron VL reranker (llama-nemotron-rerank-vl).

    python examples/rerank_images.py /path/to/checkpoint page1.png page2.png ...

Both checkpoints bring their own score template (and jina its end token and logit
bias), so ``LLM.score`` needs no template. jina's own scoring code bounds images to
3136..602112 pixels; ``mm_processor_kwargs`` sets the same bounds here. The Nemotron
rerankers cut each image into tiles as their processor does. Documents are vLLM's
score items: a string, or ``{"content": [parts]}`` with text and image parts.
"""
import json
import os
import sys

from PIL import Image

from pyengine import LLM


def main(model, paths):
    with open(os.path.join(model, "config.json")) as f:
        archs = json.load(f).get("architectures") or []
    jina = any(a.startswith("JinaVL") for a in archs)
    llm = LLM(model, mm_processor_kwargs={"min_pixels": 3136, "max_pixels": 602112} if jina else None)
    query = "slm markdown"
    docs = [{"content": [{"type": "image_pil", "image_pil": Image.open(p).convert("RGB")}]} for p in paths]
    docs.append("Markdown is a lightweight markup language for formatting plain text.")
    names = list(paths) + ["(a text document)"]
    outs = llm.score(query, docs)
    for out, name in sorted(zip(outs, names), key=lambda x: -x[0].outputs.score):
        print(f"{out.outputs.score:.4f}  {name}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
