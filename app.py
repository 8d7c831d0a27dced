"""fromage_gill chat: a Gradio app to talk with a FROMAGe / GILL model about images, and get images back.

    python app.py                              # the published GILL model (GPU; downloads weights on first use)
    python app.py --model toy-gill             # offline demo: the toy world's GILL, trained on a CPU (checkpoints/)
    python app.py --model tiny-gill            # offline plumbing check: tiny random model, gibberish answers
    fromage-gill serve --model gill --load-8bit --port 7860

This file is the layout and its wiring: ``build_demo(pipeline)`` lays out the page (``lay_out``, the settings from
the table in ``chat/controls.py``) and connects each event to its handler in ``fromage_gill/chat/handlers.py``,
where the conversation logic lives without gradio (docs/app.md says which file holds what). Every button is also a
named API endpoint for ``gradio_client`` (see ``API_ENDPOINTS``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from fromage_gill.chat import options as startup  # noqa: E402  (the flags, loading the model)
from fromage_gill.chat import page as site  # noqa: E402  (the page's text, look and script)
from fromage_gill.chat.controls import Control, kept_values, starting_value  # noqa: E402
from fromage_gill.chat.handlers import ChatHandlers, Reply  # noqa: E402
from fromage_gill.chat.messages import IMAGE_PLACEHOLDER  # noqa: E402
from fromage_gill.chat.options import AppOptions, load_indexes  # noqa: E402
from fromage_gill.chat.space import space_argv  # noqa: E402
from fromage_gill.serve.api import gradio_app_kwargs  # noqa: E402

__all__ = ["API_ENDPOINTS", "AppOptions", "build_demo", "launch_style", "load_indexes", "main", "serve"]

API_ENDPOINTS = ("send", "regenerate", "undo", "clear", "stop", "edit", "export_html", "export_json", "load_json")
API_ENDPOINTS += ("history",)
Page = SimpleNamespace  # the page's components, as lay_out names them
QUICK = dict(concurrency_limit=None)  # actions that never wait for the model
PRIVATE = dict(api_visibility="private")  # UI-only events: the API has its own endpoint for each
CONTROL_KINDS = {"slider": gr.Slider, "choice": gr.Radio, "dropdown": gr.Dropdown, "text": gr.Textbox}


def build_demo(pipeline, options: AppOptions | None = None, handlers: ChatHandlers | None = None) -> gr.Blocks:
    """The chat UI for ``pipeline`` (``handlers``: made already); every action is an endpoint of ``API_ENDPOINTS``."""
    h = handlers or ChatHandlers(pipeline, options)
    gr.set_static_paths([h.image_root])  # the chat shows its images as links to these files (messages.py)
    with gr.Blocks(title=f"fromage_gill · {h.model_name}", delete_cache=(1800, 3600)) as demo:
        page = lay_out(h, pipeline)
        changes = wire_turns(h, page) + wire_actions(h, page)
        wire_sidebar(h, page, demo, changes)
    demo.queue(max_size=h.options.max_queue, default_concurrency_limit=h.options.max_queue)
    return demo


# -- the layout ----------------------------------------------------------------------------------------------------


def lay_out(h: ChatHandlers, pipeline) -> Page:
    """The page's components, top to bottom: the sidebar of conversations, the header, the chat, its message box
    and buttons, the delete confirmation, the examples, the settings and the export panel."""
    page = Page()
    page.state = gr.State(None, time_to_live=h.options.session_ttl_s, delete_callback=h.close_session)
    page.settings_kept = gr.BrowserState({}, storage_key="fromage_gill_settings")
    # The browser keeps only an owner token the server signed (chat/owner.py); BrowserState's key is public.
    page.browser = gr.BrowserState({"owner": None}, storage_key="fromage_gill_chat", secret=h.browser_key)
    with gr.Sidebar(open=True, elem_id="sidebar", label="Conversations"):
        page.new_chat = gr.Button("New chat", elem_id="new_chat", variant="primary", size="sm")
        page.saved = gr.Radio([], label="Earlier conversations", elem_id="conversations", interactive=True)
        page.rename_text = gr.Textbox(label="Name this conversation", elem_id="rename_text", max_lines=1)
        with gr.Row():
            page.rename = gr.Button("Rename", elem_id="rename", size="sm")
            page.delete = gr.Button("Delete", elem_id="delete", size="sm", variant="stop")
    gr.Markdown(site.header_markdown(pipeline, h.index_names), elem_id="header")
    page.chatbot = gr.Chatbot(
        elem_id="chatbot", show_label=False, height="68vh", min_height=420, editable="user",
        group_consecutive_messages=False, buttons=["copy", "copy_all"],
        placeholder="Attach one or more images and ask about them, or ask for a picture.",
    )  # fmt: skip
    # No file_types filter: any file reaches the app, which explains why it cannot use it. The send arrow stays
    # while an answer runs (what is sent then waits for it); the Stop button below stops the answer. A long paste
    # stays text (gradio's default turns more than 1000 characters into a file).
    page.message = gr.MultimodalTextbox(
        elem_id="message", file_count="multiple", sources=["upload"], show_label=False, autofocus=True,
        max_plain_text_length=100_000,
        placeholder=f"Message (attach images with the clip, paste or drop them; {IMAGE_PLACEHOLDER} places an image "
        "within the text)",
    )  # fmt: skip
    with gr.Row(elem_id="buttons"):
        page.stop = gr.Button("Stop", elem_id="stop", variant="stop", size="sm", visible=False)
        page.regenerate = gr.Button("Regenerate", elem_id="regenerate", size="sm")
        page.undo = gr.Button("Undo", elem_id="undo", size="sm")
        page.clear = gr.Button("Delete chat", elem_id="clear", size="sm")
    page.buttons = [page.stop, page.regenerate, page.undo, page.clear]
    with gr.Row(visible=False, elem_id="confirm") as page.confirm:
        gr.Markdown("**Delete this conversation?** It is removed from the list and cannot be brought back.")
        page.delete_yes = gr.Button("Delete", elem_id="confirm_delete", variant="stop", size="sm")
        page.delete_no = gr.Button("Keep it", elem_id="keep", size="sm")
    if examples := [[e] for e in site.example_messages(pipeline)]:
        gr.Examples(examples, inputs=[page.message], label="Examples (click, then send)", elem_id="examples")
    with gr.Accordion("Settings", open=False, elem_id="settings"):
        page.controls = settings_controls(h.settings_table, h.defaults)
    with gr.Accordion("Export / load", open=False, elem_id="export"):
        with gr.Row():
            page.export_html = gr.Button("Export HTML", elem_id="export_html", size="sm")
            page.export_json = gr.Button("Export JSON", elem_id="export_json", size="sm")
            page.load_json = gr.UploadButton("Load JSON", file_types=[".json"], elem_id="load_json", size="sm")
        page.export_file = gr.File(label="Download", elem_id="export_file", interactive=False)
    return page


def settings_controls(table: list[Control], defaults: dict[str, Any]) -> dict[str, Any]:
    """One component per row of the settings table (controls.settings_table), keyed by its API parameter name."""
    made: dict[str, Any] = {}
    for row in sorted({c.row for c in table}):
        with gr.Row():
            for c in (c for c in table if c.row == row):
                common = dict(label=c.label, info=c.help, elem_id=c.elem_id, visible=c.visible)
                common.update(value=starting_value(c, defaults), **({"step": c.step} if c.kind == "slider" else {}))
                first = c.bounds if c.kind == "slider" else [list(c.choices)] if c.choices else []
                made[c.key] = CONTROL_KINDS[c.kind](*first, **common)
    return made


# -- the wiring ----------------------------------------------------------------------------------------------------


def wire_turns(h: ChatHandlers, page: Page) -> list[Any]:
    """The events that run the model: send (Enter or the arrow, also while an answer runs: it is sent after it),
    regenerate, edit; their outputs are the Reply's values."""
    edit_turn, edit_text = gr.Number(visible=False, precision=0), gr.Textbox(visible=False)
    edit_btn = gr.Button(visible=False)  # API-only: branch from a past message (the UI edits in the chat itself)

    def ui_edit(session, data: gr.EditData, **ui):
        i = data.index if isinstance(data.index, int) else data.index[0]
        yield from h.edit_shown(session, i, data.value, **ui)

    outputs, queue = [page.state, page.chatbot, page.message, *page.buttons], h.options.max_queue
    turn = dict(outputs=outputs, inputs_kwargs=page.controls, concurrency_id="model", concurrency_limit=queue)
    s = page.state
    return [
        page.message.submit(shown(h.send), inputs=[s, page.message], api_name="send", trigger_mode="multiple", **turn),
        page.regenerate.click(shown(h.regenerate), inputs=[s], api_name="regenerate", **turn),
        page.chatbot.retry(shown(h.regenerate), inputs=[s], **PRIVATE, **turn),
        edit_btn.click(shown(h.edit), inputs=[s, edit_turn, edit_text], api_name="edit", **turn),
        page.chatbot.edit(shown(ui_edit), inputs=[s], **PRIVATE, **turn),
    ]


def wire_actions(h: ChatHandlers, page: Page) -> list[Any]:
    """Stop, undo, delete (after a confirmation), export and load, the history endpoint."""
    s, box = page.state, [page.state, page.chatbot, page.message, *page.buttons]
    page.stop.click(h.stop, inputs=[s], outputs=[s], api_name="stop", **QUICK)
    undone = page.undo.click(shown(h.undo, box=False), inputs=[s], outputs=[s, page.chatbot], api_name="undo", **QUICK)
    for asks in (page.clear, page.delete):  # nothing is deleted on one click: the page asks first
        asks.click(lambda: gr.update(visible=True), outputs=[page.confirm], **PRIVATE, **QUICK)
    page.delete_no.click(lambda: gr.update(visible=False), outputs=[page.confirm], **PRIVATE, **QUICK)
    cleared = page.delete_yes.click(shown(h.clear), inputs=[s], outputs=box, api_name="clear", **QUICK)
    cleared.then(lambda: gr.update(visible=False), outputs=[page.confirm], **PRIVATE, **QUICK)
    out = [page.export_file]
    page.export_html.click(exported(h.export_html), inputs=[s], outputs=out, api_name="export_html", **QUICK)
    page.export_json.click(exported(h.export_json), inputs=[s], outputs=out, api_name="export_json", **QUICK)

    def load(session, file):
        return switched(h.load_json(session, file), page)

    to = [s, page.chatbot, *page.controls.values()]
    loaded = page.load_json.upload(load, inputs=[s, page.load_json], outputs=to, api_name="load_json", **QUICK)
    history_btn, history_json = gr.Button(visible=False), gr.JSON(visible=False)
    history_btn.click(h.history, inputs=[s], outputs=[history_json], api_name="history", **QUICK)
    named = dict(inputs=[s, page.rename_text], outputs=[s, page.chatbot], **PRIVATE, **QUICK)
    renamed = page.rename.click(shown(h.rename, box=False), **named)
    return [undone, cleared, loaded, renamed]


def wire_sidebar(h: ChatHandlers, page: Page, demo: gr.Blocks, changes: list[Any]) -> None:
    """The conversations kept across reloads and restarts, the settings kept in the browser, and a page loaded
    while its answer runs (it shows it streaming, then finished)."""

    def listed(session):
        convs = h.conversations(session)
        current = session.conversation if session is not None else None
        choices = [(site.conversation_label(c.title, c.updated), c.id) for c in convs]
        return gr.update(choices=choices, value=current if current in {c.id for c in convs} else None)

    def restore(kept) -> Iterator[tuple]:
        session, kept = h.restore(kept)
        now = Reply(session, h.view(session), running=session.streaming, notes=session.take_notes())
        toast(now, duration=None)  # what could not be restored, and why: shown until closed
        yield session, now.messages, kept, listed(session), *reply_values(now)[2:]
        for reply in h.live.follow(session):
            yield reply.session, reply.messages, gr.update(), gr.update(), *reply_values(reply)[2:]

    def switch(handler):
        return lambda session, *args: switched(handler(session, *args), page, listed=listed)

    box = [page.message, *page.buttons]
    demo.load(restore, inputs=[page.browser], outputs=[page.state, page.chatbot, page.browser, page.saved, *box])
    keys, controls = list(page.controls), list(page.controls.values())

    def settings_of(kept):  # those kept in this browser, if they still fit this model's ranges
        values = kept_values(h.settings_table, kept)
        return [values.get(k, gr.update()) for k in keys]

    demo.load(settings_of, inputs=[page.settings_kept], outputs=controls, **PRIVATE)
    kept = [c.change for c in controls]
    gr.on(kept, lambda *v: dict(zip(keys, v, strict=True)), inputs=controls, outputs=[page.settings_kept], **PRIVATE)
    out = [page.state, page.chatbot, page.saved, *page.controls.values()]
    page.new_chat.click(switch(h.new_chat), inputs=[page.state], outputs=out, **PRIVATE, **QUICK)
    page.saved.input(switch(h.open_conversation), inputs=[page.state, page.saved], outputs=out, **PRIVATE, **QUICK)
    for changed in changes:  # the list shows each conversation's title and the current one
        changed.then(listed, inputs=[page.state], outputs=[page.saved], **PRIVATE, **QUICK)


def reply_values(reply: Reply, *, box: bool = True) -> tuple:
    """A Reply as the values of (state, chatbot[, message box, Stop, Regenerate, Undo, Delete]); its notes become
    toasts. Stop shows only while an answer runs; the others cannot act then."""
    toast(reply)
    if not box:
        return reply.session, reply.messages
    idle = gr.update(interactive=not reply.running)
    cleared = gr.update(value=None) if reply.clear_box else gr.update()
    return reply.session, reply.messages, cleared, gr.update(visible=reply.running), idle, idle, idle


def switched(reply: Reply, page: Page, *, listed: Callable[..., Any] | None = None) -> tuple:
    """A Reply that changes the conversation: (state, chatbot[, sidebar list], each settings control)."""
    toast(reply)
    values = reply.controls or {}
    head = (reply.session, reply.messages) + ((listed(reply.session),) if listed else ())
    return (*head, *[values.get(k, gr.update()) for k in page.controls])


def toast(reply: Reply, duration: float | None = 8) -> None:
    """A reply's notes as toasts (errors as warnings, the rest as information) that clear themselves by default."""
    for note in reply.notes:
        (gr.Warning if note.kind == "error" else gr.Info)(note.text, duration=duration)


def exported(handler: Callable[..., Any]) -> Callable[..., Any]:
    """An export handler: the file to download (the box shows only then: page.py's CSS); a refusal is a toast."""

    @functools.wraps(handler)
    def run(session):
        path = handler(session)
        toast(Reply(session, [], notes=session.take_notes() if session is not None else []))
        return path

    return run


def shown(handler: Callable[..., Any], *, box: bool = True) -> Callable[..., Any]:
    """``handler`` (returning a Reply or yielding Replies) with its Replies as ``reply_values``; its signature is
    kept, since gradio names the API's parameters after it and passes the settings controls by name."""
    if not inspect.isgeneratorfunction(handler):
        return functools.wraps(handler)(lambda *args, **kwargs: reply_values(handler(*args, **kwargs), box=box))

    @functools.wraps(handler)
    def streamed(*args, **kwargs):
        for reply in handler(*args, **kwargs):
            yield reply_values(reply, box=box)

    return streamed


def launch_style() -> dict[str, Any]:
    """``launch()`` arguments for the look (Gradio 6 takes theme, CSS and scripts at launch) and the photos."""
    # The system's fonts: the theme's default Google fonts would make every visitor's browser fetch from Google.
    theme = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    paths = [str(site.ASSETS), str(site.TOY_INDEXES)]
    return dict(theme=theme, css=site.PAGE_CSS, js=site.PAGE_JS, allowed_paths=paths, max_file_size="50mb")


# -- command line --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description="Chat with a FROMAGe / GILL model in the browser.")
    startup.add_serve_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    args = parser.parse_args(space_argv(argv))  # on a Hugging Face Space: fetch the weights, use ZeroGPU
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    """Load the model (showing progress), then build and launch the demo. Shared by ``fromage-gill serve``."""
    from fromage_gill.hub import HubUnavailableError

    verbose = getattr(args, "verbose", False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.monotonic()
    print(f"fromage_gill: {startup.loading_line(args.model)}", file=sys.stderr)
    try:
        pipeline, options = startup.load_app(args)
    except (HubUnavailableError, ValueError, OSError) as e:
        if verbose:
            raise
        print(
            f"fromage_gill: {startup.offline_hint(args.model) if isinstance(e, HubUnavailableError) else e}",
            file=sys.stderr,
        )
        return 2
    print(f"fromage_gill: {args.model} loaded in {time.monotonic() - t0:.0f} s; starting the app", file=sys.stderr)
    demo = build_demo(pipeline, options, handlers=(handlers := ChatHandlers(pipeline, options)))
    # the /v1 API (docs/serving.md): its requests decode in one batch with the visitors' turns, on one engine
    api = gradio_app_kwargs(pipeline, options, engine=handlers.engine) if args.api else None
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, app_kwargs=api, **launch_style())
    return 0


if __name__ == "__main__":
    sys.exit(main())
