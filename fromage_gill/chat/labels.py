"""The line under an image of an answer: where it came from (**Retrieved**, score, caption, source link, or
**Generated**, seed) and GILL's decision probabilities; as markdown for the chat, HTML for an export, and plain
text for alt texts and the API's ``/history``."""

from __future__ import annotations

import html
import re
from typing import Any


def image_label(seg: Any) -> str:
    """The markdown line under an image in the answer: where it came from, and the detail line ("" for the user's
    own images)."""
    source = getattr(seg, "source", None)
    if source == "retrieved":
        score = getattr(seg, "score", None)
        head = "**Retrieved**" + (f" (score {score:.3f})" if score is not None else "")
        caption = getattr(seg, "caption", None)
        url = getattr(seg, "url", None)
        if caption:
            head += f" · {_md_escape(caption)}"
        if url and url.startswith(("http://", "https://")):
            head += f" · [source]({url})"
    elif source == "generated":
        seed = getattr(seg, "seed", None)
        head = "**Generated**" + (f" (seed {seed})" if seed is not None else "")
    else:
        return ""
    decision = getattr(seg, "decision", None)
    if decision is not None:
        p_gen, p_ret = decision
        head += f"  \n<small>decision: p(generate) = {p_gen:.2f}, p(retrieve) = {p_ret:.2f}</small>"
    return head


def html_label(seg: Any) -> str:
    """``image_label`` as HTML, for the exported page (a figure's caption)."""
    source = getattr(seg, "source", None)
    if source == "retrieved":
        score = getattr(seg, "score", None)
        text = "<b>Retrieved</b>" + (f" (score {score:.3f})" if score is not None else "")
        if getattr(seg, "caption", None):
            text += f" · {html.escape(seg.caption)}"
        if (getattr(seg, "url", None) or "").startswith(("http://", "https://")):
            text += f' · <a href="{html.escape(seg.url, quote=True)}">source</a>'
    else:
        seed = getattr(seg, "seed", None)
        text = "<b>Generated</b>" + (f" (seed {seed})" if seed is not None else "")
    decision = getattr(seg, "decision", None)
    if decision is not None:
        text += f"<br>decision: p(generate) = {decision[0]:.2f}, p(retrieve) = {decision[1]:.2f}"
    return text


def plain_text(markdown: str) -> str:
    """A label without its markup: the detail line joined with a dash."""
    return re.sub(r"<[^>]+>|\*\*|\\", "", markdown).replace("  \n", " — ")


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)
