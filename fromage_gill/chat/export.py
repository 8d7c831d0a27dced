"""Export and import of a conversation: JSON (the engine's saved chat, each answer with its seed and end reason,
plus the app's settings, to continue elsewhere) and a self-contained HTML page; ``read_export`` checks a JSON
export before it is loaded."""

from __future__ import annotations

import base64
import datetime
import html
import io
from pathlib import Path

from PIL import Image

from ..generate.history import FORMAT as EXPORT_FORMAT
from ..generate.history import JSON, read_history_json
from ..generate.history import VERSION as EXPORT_VERSION
from .labels import html_label, image_label, plain_text
from .session import ChatSession, settings_dict

MAX_EXPORT_BYTES = 200 * 1024 * 1024


class ChatExportError(ValueError):
    """A conversation export that cannot be loaded; the message says what is wrong with it."""


def export_json(session: ChatSession, *, model_name: str) -> JSON:
    """Everything needed to continue the chat elsewhere: the engine's saved chat (``Chat.to_dict``: text, images as
    PNG, their labels, each answer's tokens, seed and end reason) plus the settings last used."""
    data = session.chat.to_dict()
    data.update(
        {
            "model": model_name,
            "exported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings_dict(session.settings),
        }
    )
    return data


def read_export(source: str | Path | bytes) -> JSON:
    """Parse a JSON export and check what the app adds to the engine's saved chat (``Chat.from_dict`` checks the
    turns, and the ``seeds`` of an older export); ``ChatExportError`` says what is wrong. ``settings`` comes back
    as a dict."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.stat().st_size > MAX_EXPORT_BYTES:
            raise ChatExportError(f"{path.name} is larger than {MAX_EXPORT_BYTES // 2**20} MB; not a chat export")
        source = path.read_bytes()
    try:  # bounded parse: bytes, nesting depth, number of values, no NaN (a crafted file cannot recurse or balloon)
        data = read_history_json(source, max_bytes=MAX_EXPORT_BYTES)
    except ValueError as e:  # its messages name the limit crossed and say to load a file saved with 'Export JSON'
        raise ChatExportError(str(e)) from None
    if data.get("format") != EXPORT_FORMAT:
        raise ChatExportError(
            f'the file is not a fromage_gill chat export (its "format" must be '
            f"{EXPORT_FORMAT!r}); load a file saved with 'Export JSON'"
        )
    if data.get("version") != EXPORT_VERSION:
        raise ChatExportError(
            f"unsupported export version {data.get('version')!r}; this app reads version {EXPORT_VERSION}"
        )
    data.setdefault("settings", {})
    if not isinstance(data["settings"], dict):
        raise ChatExportError("the export's 'settings' must be a JSON object; the file was edited or is damaged")
    return data


def export_html(session: ChatSession, *, model_name: str, title: str = "fromage_gill conversation") -> str:
    """A self-contained HTML page of the conversation: images embedded as data URIs, labels, settings and seeds."""
    rows = []
    for turn in session.chat.history:
        parts = []
        for seg in turn.segments:
            if isinstance(seg, str):
                parts.append(f"<p>{html.escape(seg).replace(chr(10), '<br>')}</p>")
                continue
            label = plain_text(image_label(seg))
            parts.append(
                f'<figure><img src="{_data_uri(seg.image)}" alt="{html.escape(label or "image")}">'
                + (f"<figcaption>{html_label(seg)}</figcaption>" if label else "")
                + "</figure>"
            )
        seed = f'<div class="seed">seed {turn.seed}</div>' if turn.seed is not None else ""
        rows.append(
            f'<div class="msg {html.escape(turn.role)}"><div class="role">{html.escape(turn.role)}</div>'
            f"{''.join(parts)}{seed}</div>"
        )
    settings = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
        for k, v in settings_dict(session.settings).items()
    )
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; max-width: 760px; margin: 2em auto; padding: 0 1em; color: #222; }}
.msg {{ border-radius: 12px; padding: .6em 1em; margin: .8em 0; }}
.user {{ background: #eef3ff; margin-left: 15%; }} .assistant {{ background: #f6f6f6; margin-right: 15%; }}
.role {{ font-size: .75em; text-transform: uppercase; color: #777; }}
img {{ max-width: 100%; max-height: 320px; border-radius: 6px; }} figure {{ margin: .5em 0; }}
figcaption, .seed {{ font-size: .8em; color: #555; }} table {{ font-size: .8em; border-collapse: collapse; }}
td {{ border-bottom: 1px solid #ddd; padding: 2px 8px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Model <code>{html.escape(model_name)}</code> · exported {when}</p>
{"".join(rows)}
<details><summary>Settings</summary><table>{settings}</table></details>
</body></html>
"""


def _data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
