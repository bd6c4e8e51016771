"""Rerank page images (and texts) against a query with jina-reranker-m0.

    python examples/rerank_images.py /path/to/jina-reranker-m0 page1.png page2.png ...

The checkpoint (architecture JinaVLForRanking) brings its own score template, end token
and logit bias, so ``LLM.score`` needs no template. Its own scoring code bounds images
to 3136..602112 pixels; ``mm_processor_kwargs`` sets the same bounds here. Documents are
vLLM's score items: a string, or ``{"content": [parts]}`` with text and image parts.
"""
import sys

from PIL import Image

from pyengine import LLM


def main(model, paths):
    llm = LLM(model, mm_processor_kwargs={"min_pixels": 3136, "max_pixels": 602112})
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
