"""What the app's page says besides the conversation: the header (which model, what it can do) and the example
messages under the message box."""

from __future__ import annotations

import datetime
import time
from typing import Any

from ..paths import CHECKOUT_ROOT
from ..pipeline import Pipeline

ASSETS = CHECKOUT_ROOT / "assets"  # the public-domain example photos
TOY_INDEXES = CHECKOUT_ROOT / "checkpoints" / "indexes"  # the toy world's gallery and indexes, once built


def header_markdown(pipeline: Pipeline, index_names: list[str]) -> str:
    cfg = pipeline.config
    what = "GILL (retrieves and generates images)" if cfg.kind == "gill" else "FROMAGe (retrieves images)"
    lines = [f"## fromage_gill · `{cfg.name}` — {what}"]
    if cfg.is_random:
        lines.append(
            "*Offline demo model with random weights: it runs anywhere in seconds, and its answers are "
            "gibberish. Start the published model with `python app.py --model gill`.*"
        )
    elif cfg.name.startswith("toy-"):
        lines.append(
            "*Toy-world model trained on a CPU: it knows only its synthetic world of coloured shapes (six "
            "shapes, six colours, plain backgrounds). Try the examples below.*"
        )
    if cfg.kind == "gill" and pipeline.model.decision is None:
        lines.append(
            "*Running without GILL's decision head (`--no-decision-model`): every image follows the Mode "
            "setting (auto: retrieved when an index is loaded, else generated).*"
        )
    if pipeline.index is None and not index_names:
        lines.append("*No image index is loaded, so images can only be generated (pass `--index DIR`).*")
    return "\n\n".join(lines)


def example_messages(pipeline: Pipeline | None = None) -> list[dict[str, Any]]:
    """Example messages from the photos shipped in ``assets/`` (none when there are no photos); for a toy-world
    model, from its gallery of world images."""
    gallery = TOY_INDEXES / "toy-gallery" / "images"
    if pipeline is not None and pipeline.config.name.startswith("toy-") and gallery.is_dir():
        from ..toy.world import gallery_scenes  # the world alone: no training code in the app

        files = sorted(gallery.glob("*.png"))
        singles = [str(f) for f, s in zip(files, gallery_scenes(len(files)), strict=True) if len(s.things) == 1]
        wanted = [
            ("What is in this image?", singles[:1]),
            ("Show me a photo of a green triangle.", []),
            ("Draw a red circle.", []),
            # Not "What shape is this?": on this picture the toy LM runs on past "it is a ring" (measured); it was
            # trained on both questions, and describes the picture in one clean sentence.
            ("Describe the picture.", singles[1:2]),
        ]
        return [{"text": text, "files": files} for text, files in wanted if len(singles) >= 2]
    photos = {p.stem: p for p in (ASSETS / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    wanted = [
        ("What is in this picture?", ["chelsea"]),
        ("How are these two pictures different?", ["astronaut", "rocket"]),
        ("Show me another picture like this one.", ["coffee"]),
        ("Draw a picture of a cat sleeping on a red sofa.", []),
    ]
    return [
        {"text": text, "files": [str(photos[n]) for n in names]}
        for text, names in wanted
        if all(n in photos for n in names)
    ]


def conversation_label(title: str, updated: float, now: float | None = None) -> str:
    """A line of the sidebar's list: the conversation's title and when it last changed ("5 min ago", "yesterday",
    an ISO date after a week), so that twelve chats that start alike can be told apart."""
    seconds = max(0.0, (time.time() if now is None else now) - updated)
    if seconds < 60:
        when = "just now"
    elif seconds < 3600:
        when = f"{int(seconds // 60)} min ago"
    elif seconds < 86400:
        when = f"{int(seconds // 3600)} h ago"
    elif seconds < 2 * 86400:
        when = "yesterday"
    elif seconds < 7 * 86400:
        when = f"{int(seconds // 86400)} days ago"
    else:
        when = datetime.date.fromtimestamp(updated).isoformat()
    return f"{title} · {when}"


PAGE_CSS = """
#chatbot .message-row img { max-height: 240px; max-width: 100%; width: auto; object-fit: contain; cursor: zoom-in; }
#chatbot .message figcaption, #chatbot small, #chatbot .image-label { opacity: .8; }
/* an image you sent is not text to edit: only the text parts of your messages get an Edit button */
#chatbot .message-row.user-row:has(img) + .message-buttons button[aria-label='Edit'] { display: none; }
/* the chat's own trash icon deletes without asking: the Delete chat button asks first */
#chatbot button[aria-label='Clear'] { display: none; }
#buttons button { min-width: 0; }
/* the download box shows once there is a file to download (empty, it took 250 px) */
#export_file:not(:has(a)) { display: none; }
/* the chat's own icons (copy all) get a row of their own above the messages, never on one */
#chatbot .top-panel { position: static !important; display: flex; justify-content: flex-end; margin: 4px 8px 0 auto; }
/* one toast at a time: the newest; the older ones would stack over the title */
.toast-wrap > :not(:last-child) { display: none !important; }
/* a phone (390 px wide): a shorter chat keeps the message box on screen; images fit the bubble */
@media (max-width: 480px) {
  #chatbot { height: 58vh !important; min-height: 300px !important; }
  #chatbot .message-row img { max-height: 180px; }
  #header h2 { font-size: 1.05rem; }
}
"""

# The sidebar closed on a phone. Copy (one message) and copy all put the words in the clipboard, as they read:
# without the images' server paths, their labels or markup. Gradio's own buttons copy the message's markdown source;
# this runs after them.
PAGE_JS = """
() => {
  // The conversations' sidebar starts open on a desktop; on a phone it would cover the chat.
  const closeOnPhone = (tries) => {
    const bar = document.querySelector('#sidebar');
    if (!bar) { if (tries) setTimeout(() => closeOnPhone(tries - 1), 100); return; }
    if (window.innerWidth < 700 && bar.classList.contains('open')) bar.querySelector('.toggle-button')?.click();
  };
  closeOnPhone(50);
  const words = (el) => {
    const c = el.cloneNode(true);
    c.querySelectorAll('img, .image-label, button, .message-buttons').forEach((e) => e.remove());
    return c.innerText.replace(/\\n{3,}/g, '\\n\\n').trim();
  };
  document.addEventListener('click', (ev) => {
    const button = ev.target.closest && ev.target.closest('#chatbot button');
    const name = button ? (button.getAttribute('aria-label') || button.title || '').toLowerCase() : '';
    if (!name.includes('copy')) return;
    let text;
    const rows = [...document.querySelectorAll('#chatbot .message-row')];
    if (name.includes('all') || button.closest('.top-panel')) {
      text = rows.map((r) => (r.classList.contains('user-row') ? 'You: ' : 'Answer: ') + words(r))
                 .filter((t) => !/^(You|Answer): $/.test(t)).join('\\n\\n');
    } else {
      const row = rows.filter((r) => r.compareDocumentPosition(button) & Node.DOCUMENT_POSITION_FOLLOWING).pop()
               || button.closest('.message-row');
      if (!row) return;
      text = words(row);
    }
    setTimeout(() => navigator.clipboard.writeText(text), 150);
  }, true);
}
"""
