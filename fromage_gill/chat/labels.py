"""The line under an image of an answer: where it came from (**Retrieved**, score, caption, source link, or
**Generated**, seed) and GILL's decision probabilities; as markdown for the chat, HTML for an export, and plain
text for alt texts and the API's ``/history``."""

from __future__ import annotations

import html
import re

from PIL import Image

from ..generate.prompt import ImageSegment


def image_label(seg: ImageSegment | Image.Image) -> str:
    """The markdown line under an image in the answer: where it came from, and the detail line ("" for the user's
    own images, kept or as sent)."""
    if not isinstance(seg, ImageSegment):
        return ""
    if seg.source == "retrieved":
        head = "**Retrieved**" + (f" (score {seg.score:.3f})" if seg.score is not None else "")
        if seg.caption:
            head += f" · {_md_escape(seg.caption)}"
        if seg.url and seg.url.startswith(("http://", "https://")):
            head += f" · [source]({seg.url})"
    elif seg.source == "generated":
        head = "**Generated**" + (f" (seed {seg.seed})" if seg.seed is not None else "")
    else:
        return ""
    if seg.decision is not None:
        p_gen, p_ret = seg.decision
        head += f"  \n<small>decision: p(generate) = {p_gen:.2f}, p(retrieve) = {p_ret:.2f}</small>"
    return head


def html_label(seg: ImageSegment) -> str:
    """``image_label`` as HTML, for the exported page (a figure's caption)."""
    if seg.source == "retrieved":
        text = "<b>Retrieved</b>" + (f" (score {seg.score:.3f})" if seg.score is not None else "")
        if seg.caption:
            text += f" · {html.escape(seg.caption)}"
        if (seg.url or "").startswith(("http://", "https://")):
            text += f' · <a href="{html.escape(seg.url or "", quote=True)}">source</a>'
    else:
        text = "<b>Generated</b>" + (f" (seed {seg.seed})" if seg.seed is not None else "")
    if seg.decision is not None:
        text += (
            f"<br>decision: p(generate) = {seg.decision.p_generate:.2f}, p(retrieve) = {seg.decision.p_retrieve:.2f}"
        )
    return text


def plain_text(markdown: str) -> str:
    """A label without its markup: the detail line joined with a dash."""
    return re.sub(r"<[^>]+>|\*\*|\\", "", markdown).replace("  \n", " — ")


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)
