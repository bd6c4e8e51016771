"""Rerank documents with Qwen3-Reranker, a causal LM read as a yes/no classifier.

    python examples/rerank_qwen3.py /path/to/Qwen3-Reranker-0.6B

``is_original_qwen3_reranker`` turns the checkpoint into a one-logit classifier whose
head is W_lm["yes"] - W_lm["no"]; its sigmoid is the model's probability of answering
"yes". The template frames each (query, document) pair as the model was trained.
"""
import os
import sys

from pyengine import LLM

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "qwen3_reranker.jinja")


def main(model):
    # Qwen3 allows 40k positions; a smaller max_model_len fits the default batch budget.
    llm = LLM(model, hf_overrides={"is_original_qwen3_reranker": True}, max_model_len=8192)
    query = "What is the capital of China?"
    docs = ["The capital of China is Beijing.",
            "Gravity is a force that attracts two bodies towards each other.",
            "Beijing has been the seat of China's government for most of the last eight centuries."]
    outs = llm.score(query, docs, score_template=TEMPLATE)
    for out, doc in sorted(zip(outs, docs), key=lambda x: -x[0].outputs.score):
        print(f"{out.outputs.score:.4f}  {doc}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
