"""Score templates: one prompt per (query, document) pair, for LLM-as-reranker models.

A template is Jinja source (a string, or the path of a file holding it) that sees the
variables ``query`` and ``document``, and ``messages`` = [{"role": "query", "content":
query}, {"role": "document", "content": document}] as vLLM's score templates read them
(so those files work unchanged), and renders the whole prompt the model was trained
on, e.g. Qwen3-Reranker's chat frame ending in the assistant turn whose next token is
"yes" or "no" (examples/qwen3_reranker.jinja). The rendered text is tokenised as one
text with the tokenizer's special tokens added as for any prompt (a BOS where the
tokenizer adds one; Qwen adds none), so a template must not write the BOS itself.
Rendering runs in Jinja's sandbox, keeps the trailing newline and fails on undefined
variables (``{{ instruction | default("...") }}`` stays possible).
"""
from __future__ import annotations

import os


def read_template(template, what="score_template"):
    """Jinja source from ``template``: the source itself, or a path to a file of it (a
    string without any Jinja markup can only be a path)."""
    if isinstance(template, os.PathLike) or (isinstance(template, str) and "{" not in template):
        path = os.fspath(template)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what} {path!r} is neither Jinja source (it has no '{{') "
                                    "nor an existing file")
        with open(path) as f:
            return f.read()
    if not isinstance(template, str):
        raise TypeError(f"{what} must be a str (Jinja source or a file path), got {type(template).__name__}")
    return template


def load_score_template(template):
    """Compile ``template`` (Jinja source, or a path to a file of it; a Template this
    function made is returned as it is) into a jinja2 Template. Raises ValueError with
    the line of a syntax error."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if isinstance(template, jinja2.Template):
        return template
    template = read_template(template)
    if "query" not in template or "document" not in template:
        raise ValueError("score_template must use both variables 'query' and 'document'")
    env = ImmutableSandboxedEnvironment(keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"score_template: Jinja syntax error at line {e.lineno}: {e.message}") from e


def render_pairs(template, queries, documents, **variables):
    """One prompt string per pair. queries, documents: equal-length lists of str;
    variables: more for the template (an ``instruction``), not query, document or messages."""
    import jinja2

    clash = sorted(set(variables) & {"query", "document", "messages"})
    if clash:
        raise ValueError(f"score template variables may not set {clash}: each pair sets them")
    out = []
    for i, (q, d) in enumerate(zip(queries, documents)):
        try:
            out.append(template.render(**variables, query=q, document=d,
                                       messages=[{"role": "query", "content": q}, {"role": "document", "content": d}]))
        except jinja2.TemplateError as e:
            raise ValueError(f"score_template failed on pair {i}: {e}") from e
        if not out[-1]:
            raise ValueError(f"score_template rendered pair {i} to an empty prompt")
    return out
