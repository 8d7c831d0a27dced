"""fromage_gill chat: a Gradio app to talk with a FROMAGe / GILL model about images, and get images back.

    python app.py                              # the published GILL model (GPU; downloads weights on first use)
    python app.py --model toy-gill             # offline demo: the toy world's GILL, trained on a CPU (checkpoints/)
    python app.py --model tiny-gill            # offline plumbing check: tiny random model, gibberish answers
    fromage-gill serve --model gill --load-8bit --port 7860

This file is the layout and its wiring: ``build_demo(pipeline)`` lays out the page and connects each event to its
handler in ``fromage_gill/chat/handlers.py``, where the conversation logic lives without gradio (sessions, the
model queue, messages, export; docs/app.md says which file holds what). Every button is also a named API endpoint
for ``gradio_client`` (see ``API_ENDPOINTS``).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from fromage_gill.chat.controls import NO_INDEX, SETTINGS_HELP  # noqa: E402
from fromage_gill.chat.handlers import ChatHandlers, Reply  # noqa: E402
from fromage_gill.chat.messages import IMAGE_PLACEHOLDER  # noqa: E402
from fromage_gill.chat.options import AppOptions, add_serve_args, load_app, load_indexes  # noqa: E402
from fromage_gill.chat.page import ASSETS, TOY_INDEXES, example_messages, header_markdown  # noqa: E402
from fromage_gill.chat.space import space_argv  # noqa: E402
from fromage_gill.serve.api import gradio_app_kwargs  # noqa: E402

__all__ = ["API_ENDPOINTS", "AppOptions", "build_demo", "launch_style", "load_indexes", "main", "serve"]

API_ENDPOINTS = (
    "send",
    "regenerate",
    "undo",
    "clear",
    "stop",
    "edit",
    "export_html",
    "export_json",
    "load_json",
    "history",
)

CSS = """
#chatbot .message-row img { max-height: 240px; max-width: 100%; width: auto; object-fit: contain; }
#chatbot .message figcaption, #chatbot small { opacity: .8; }
/* an image you sent is not text to edit: only the text parts of your messages get an Edit button */
#chatbot .message-row.user-row:has(img) + .message-buttons button[aria-label='Edit'] { display: none; }
#buttons button { min-width: 0; }
/* the chat's own icons (copy all, clear) get a row of their own above the messages, never on one */
#chatbot .top-panel { position: static !important; display: flex; justify-content: flex-end; margin: 4px 8px 0 auto; }
/* a phone (390 px wide): a shorter chat keeps the message box on screen; images fit the bubble */
@media (max-width: 480px) {
  #chatbot { height: 58vh !important; min-height: 300px !important; }
  #chatbot .message-row img { max-height: 180px; }
  #header h2 { font-size: 1.05rem; }
}
.setting-help { font-size: .85em; opacity: .75; margin-top: -6px; }
"""


def build_demo(pipeline, options: AppOptions | None = None) -> gr.Blocks:
    """The chat UI for ``pipeline``; every action is also an API endpoint named in ``API_ENDPOINTS``."""
    h = ChatHandlers(pipeline, options)
    options = h.options
    gr.set_static_paths([h.image_root])  # the chat shows its images as links to these files (messages.py)
    with gr.Blocks(title=f"fromage_gill · {h.model_name}", delete_cache=(1800, 3600)) as demo:
        state = gr.State(None, time_to_live=options.session_ttl_s, delete_callback=h.close_session)
        # The browser keeps only its owner id; its conversations are stored on the server (chat/store.py).
        browser = gr.BrowserState({"owner": None}, storage_key="fromage_gill_chat", secret=h.browser_secret)
        with gr.Sidebar(open=False, elem_id="sidebar", label="Conversations"):
            new_btn = gr.Button("New chat", elem_id="new_chat", variant="primary", size="sm")
            saved = gr.Radio([], label="Earlier conversations", elem_id="conversations", interactive=True)
        gr.Markdown(header_markdown(pipeline, h.index_names), elem_id="header")
        chatbot = gr.Chatbot(
            elem_id="chatbot",
            label="Conversation",
            show_label=False,
            height="68vh",
            min_height=420,
            editable="user",
            group_consecutive_messages=False,
            buttons=["copy", "copy_all"],
            placeholder="Attach one or more images and ask about them, or ask for a picture.",
        )
        # No file_types filter: any file reaches the app, which explains in the chat why it cannot use it.
        message = gr.MultimodalTextbox(
            elem_id="message",
            file_count="multiple",
            sources=["upload"],
            label="Message",
            show_label=False,
            autofocus=True,
            stop_btn=True,  # while an answer runs, Send turns into Stop
            max_plain_text_length=100_000,  # a long paste stays text (gradio's default turns >1000 chars into a file)
            placeholder="Message (attach images with the clip, paste or drop them; "
            f"{IMAGE_PLACEHOLDER} places an image within the text)",
        )
        with gr.Row(elem_id="buttons"):
            stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", size="sm", interactive=False)
            regen_btn = gr.Button("Regenerate", elem_id="regenerate", size="sm")
            undo_btn = gr.Button("Undo", elem_id="undo", size="sm")
            clear_btn = gr.Button("Clear", elem_id="clear", size="sm")
        examples = example_messages(pipeline)
        if examples:
            gr.Examples(
                examples=[[e] for e in examples],
                inputs=[message],
                label="Examples (click, then send)",
                elem_id="examples",
            )
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            controls = settings_controls(h.defaults, h.index_names, h.decodings, max_new_tokens=h.max_new_tokens)
        with gr.Accordion("Export / load", open=False, elem_id="export"):
            with gr.Row():
                html_btn = gr.Button("Export HTML", elem_id="export_html", size="sm")
                json_btn = gr.Button("Export JSON", elem_id="export_json", size="sm")
                load_btn = gr.UploadButton("Load JSON", file_types=[".json"], elem_id="load_json", size="sm")
            export_file = gr.File(label="Download", elem_id="export_file", interactive=False)
        # API-only inputs for branching from a past message (the UI edits messages in the chat directly).
        edit_turn = gr.Number(visible=False, precision=0)
        edit_text = gr.Textbox(visible=False)
        edit_btn = gr.Button(visible=False)
        history_btn = gr.Button(visible=False)
        history_json = gr.JSON(visible=False)

        # -- wiring: each event calls its handler; the outputs are the Reply's values -----------------------------

        def ui_edit(session, data: gr.EditData, **ui):
            i = data.index if isinstance(data.index, int) else data.index[0]
            yield from h.edit_shown(session, i, data.value, **ui)

        def load_json(session, file):
            reply = h.load_json(session, file)
            toast(reply)
            values = reply.controls or {}
            return reply.session, reply.messages, *[values.get(key, gr.update()) for key in controls]

        buttons = [stop_btn, regen_btn, undo_btn, clear_btn]
        turn = dict(
            outputs=[state, chatbot, message, *buttons],
            inputs_kwargs=controls,
            concurrency_id="model",
            concurrency_limit=options.max_queue,
        )
        changes = [
            message.submit(shown(h.send), inputs=[state, message], api_name="send", **turn),
            regen_btn.click(shown(h.regenerate), inputs=[state], api_name="regenerate", **turn),
            chatbot.retry(shown(h.regenerate), inputs=[state], api_visibility="private", **turn),
            edit_btn.click(shown(h.edit), inputs=[state, edit_turn, edit_text], api_name="edit", **turn),
            chatbot.edit(shown(ui_edit), inputs=[state], api_visibility="private", **turn),
        ]

        quick = dict(concurrency_limit=None)
        stop_btn.click(h.stop, inputs=[state], outputs=[state], api_name="stop", **quick)
        message.stop(h.stop, inputs=[state], outputs=[state], api_visibility="private", **quick)
        changes.append(
            undo_btn.click(shown(h.undo, box=False), inputs=[state], outputs=[state, chatbot], api_name="undo", **quick)
        )
        changes.append(
            clear_btn.click(
                shown(h.clear), inputs=[state], outputs=[state, chatbot, message, *buttons], api_name="clear", **quick
            )
        )
        chatbot.clear(
            shown(h.clear),
            inputs=[state],
            outputs=[state, chatbot, message, *buttons],
            api_visibility="private",
            **quick,
        )
        html_btn.click(exported(h.export_html), inputs=[state], outputs=[export_file], api_name="export_html", **quick)
        json_btn.click(exported(h.export_json), inputs=[state], outputs=[export_file], api_name="export_json", **quick)
        loaded = load_btn.upload(
            load_json,
            inputs=[state, load_btn],
            outputs=[state, chatbot, *controls.values()],
            api_name="load_json",
            **quick,
        )
        changes.append(loaded)
        history_btn.click(h.history, inputs=[state], outputs=[history_json], api_name="history", **quick)

        # -- the sidebar: conversations kept across reloads and restarts ----------------------------------------

        def listed(session):
            convs = h.conversations(session)
            current = session.conversation if session is not None else None
            return gr.update(
                choices=[(c.title, c.id) for c in convs], value=current if current in {c.id for c in convs} else None
            )

        def restore(kept):
            session, kept = h.restore(kept)
            return session, h.view(session), kept, listed(session)

        def switch(reply_of):
            def run(session, *args):
                reply = reply_of(session, *args)
                toast(reply)
                values = reply.controls or {}
                return (
                    reply.session,
                    reply.messages,
                    listed(reply.session),
                    *[values.get(k, gr.update()) for k in controls],
                )

            return run

        sidebar_out = [state, chatbot, saved, *controls.values()]
        demo.load(restore, inputs=[browser], outputs=[state, chatbot, browser, saved], api_visibility="private")
        new_btn.click(switch(h.new_chat), inputs=[state], outputs=sidebar_out, api_visibility="private", **quick)
        saved.input(
            switch(h.open_conversation), inputs=[state, saved], outputs=sidebar_out, api_visibility="private", **quick
        )
        for changed in changes:  # the list shows each conversation's title and the current one
            changed.then(listed, inputs=[state], outputs=[saved], api_visibility="private", **quick)
    demo.queue(max_size=options.max_queue, default_concurrency_limit=options.max_queue)
    return demo


def exported(handler: Callable[..., Any]) -> Callable[..., Any]:
    """An export handler whose refusal (too many at once) is a toast."""

    @functools.wraps(handler)
    def run(session):
        path = handler(session)
        if session is not None:
            for note in session.take_notes():
                gr.Warning(note.text, duration=8)
        return path

    return run


def toast(reply: Reply) -> None:
    """A reply's notes as toasts that clear themselves: errors as warnings, the rest as information."""
    for note in reply.notes:
        (gr.Warning if note.kind == "error" else gr.Info)(note.text, duration=8)


def shown(handler: Callable[..., Any], *, box: bool = True) -> Callable[..., Any]:
    """``handler`` with its Replies as the values of (state, chatbot[, message box, Stop, Regenerate, Undo,
    Clear]), its notes as toasts; its signature is kept, since gradio names the API's parameters after it and
    passes the settings controls by name."""

    def values(reply: Reply) -> tuple:
        toast(reply)
        if not box:
            return reply.session, reply.messages
        idle = gr.update(interactive=not reply.running)
        return (
            reply.session,
            reply.messages,
            gr.update(value=None) if reply.clear_box else gr.update(),
            gr.update(interactive=reply.running),  # Stop
            idle,  # Regenerate, Undo, Clear: nothing they can do while an answer runs
            idle,
            idle,
        )

    if inspect.isgeneratorfunction(handler):

        @functools.wraps(handler)
        def streamed(*args, **kwargs):
            for reply in handler(*args, **kwargs):
                yield values(reply)

        return streamed

    @functools.wraps(handler)
    def returned(*args, **kwargs):
        return values(handler(*args, **kwargs))

    return returned


def settings_controls(
    defaults: Mapping[str, Any], index_names: list[str], decodings: list[str], *, max_new_tokens: int = 512
) -> dict[str, Any]:
    """The settings accordion's components, keyed by the API parameter name; ``max_new_tokens``: the most a short
    message leaves room for in the model's context, ``decodings``: those that can run on the model."""
    c: dict[str, Any] = {}
    help_ = SETTINGS_HELP.get
    c["mode"] = gr.Radio(
        ["auto", "retrieve", "generate", "text"],
        value=defaults["mode"],
        label="Images",
        info=help_("mode"),
        elem_id="set_mode",
    )
    with gr.Row():
        c["max_new_tokens"] = gr.Slider(
            1,
            max_new_tokens,
            value=defaults["max_new_tokens"],
            step=1,
            label="Max new tokens",
            info=help_("max_new_tokens"),
            elem_id="set_max_new_tokens",
        )
        c["temperature"] = gr.Slider(
            0.0,
            2.0,
            value=defaults["temperature"],
            step=0.05,
            label="Temperature",
            info=help_("temperature"),
            elem_id="set_temperature",
        )
        c["top_p"] = gr.Slider(
            0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p", info=help_("top_p"), elem_id="set_top_p"
        )
    with gr.Row():
        c["ret_scale_factor"] = gr.Slider(
            0.0,
            5.0,
            value=defaults["ret_scale_factor"],
            step=0.1,
            label="Image frequency: retrieved",
            info=help_("image_frequency"),
            elem_id="set_ret_scale",
        )
        c["gen_scale_factor"] = gr.Slider(
            0.0,
            5.0,
            value=defaults["gen_scale_factor"],
            step=0.1,
            label="Image frequency: generated",
            info=help_("image_frequency"),
            elem_id="set_gen_scale",
        )
        c["image_logit_bias"] = gr.Slider(
            -20.0,
            20.0,
            value=defaults["image_logit_bias"],
            step=0.5,
            label="Image bias",
            info=help_("image_logit_bias"),
            elem_id="set_image_bias",
        )
        c["max_images"] = gr.Slider(
            0,
            8,
            value=defaults["max_images"],
            step=1,
            label="Max images per answer",
            info=help_("max_images"),
            elem_id="set_max_images",
        )
    with gr.Row():
        c["retrieval_candidates"] = gr.Slider(
            1,
            20,
            value=defaults["retrieval_candidates"],
            step=1,
            label="Retrieval candidates",
            info=help_("retrieval_candidates"),
            elem_id="set_retrieval_candidates",
        )
        c["guidance_scale"] = gr.Slider(
            1.0,
            20.0,
            value=defaults["guidance_scale"],
            step=0.5,
            label="Guidance scale",
            info=help_("guidance_scale"),
            elem_id="set_guidance_scale",
        )
        c["num_inference_steps"] = gr.Slider(
            1,
            100,
            value=defaults["num_inference_steps"],
            step=1,
            label="Inference steps",
            info=help_("num_inference_steps"),
            elem_id="set_steps",
        )
    with gr.Row():
        seed = defaults.get("seed")
        c["seed"] = gr.Textbox(
            value="random" if seed is None else str(seed), label="Seed", info=help_("seed"), elem_id="set_seed"
        )
        names = index_names or [NO_INDEX]
        c["index"] = gr.Dropdown(
            names, value=names[0], label="Image index", info=help_("index"), visible=len(names) > 1, elem_id="set_index"
        )
        c["decoding"] = gr.Radio(
            decodings,
            value=defaults.get("decoding", "default"),
            label="Decoding",
            info=help_("decoding"),
            visible=len(decodings) > 1,
            elem_id="set_decoding",
        )
    with gr.Row():  # docs/fidelity.md: the published demos' behaviour, to reproduce the papers
        c["answer_style"] = gr.Radio(
            ["full", "published"],
            value=defaults.get("answer_style", "full"),
            label="Answer style",
            info=help_("answer_style"),
            elem_id="set_answer_style",
        )
        c["history_layout"] = gr.Radio(
            ["exact", "published"],
            value=defaults.get("history_layout", "exact"),
            label="History layout",
            info=help_("history_layout"),
            elem_id="set_history_layout",
        )
    return c


def launch_style() -> dict[str, Any]:
    """``launch()`` arguments for the look (Gradio 6 takes theme and CSS at launch) and the example photos."""
    return dict(theme=gr.themes.Soft(), css=CSS, allowed_paths=[str(ASSETS), str(TOY_INDEXES)], max_file_size="50mb")


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="app.py", description="Chat with a FROMAGe / GILL model in the browser.")
    add_serve_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument(
        "--api", action="store_true", help="also serve the OpenAI-compatible API at /v1 (docs/serving.md)"
    )
    args = parser.parse_args(space_argv(argv))  # on a Hugging Face Space: fetch the weights, use ZeroGPU
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    """Load the model (showing progress), then build and launch the demo. Shared by ``fromage-gill serve``."""
    from fromage_gill.hub import HubUnavailableError

    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.monotonic()
    print(
        f"fromage_gill: loading {args.model} (progress below; the first start downloads the weights)", file=sys.stderr
    )
    try:
        pipeline, options = load_app(args)
    except HubUnavailableError:
        if getattr(args, "verbose", False):
            raise
        print(
            f"fromage_gill: the {args.model!r} weights are not on this machine and the Hugging Face Hub is "
            f"unreachable; for the offline demo run: python app.py --model toy-gill  (details: add -v)",
            file=sys.stderr,
        )
        return 2
    except (ValueError, OSError) as e:
        if getattr(args, "verbose", False):
            raise
        print(f"fromage_gill: {e}", file=sys.stderr)
        return 2
    print(f"fromage_gill: {args.model} loaded in {time.monotonic() - t0:.0f} s; starting the app", file=sys.stderr)
    demo = build_demo(pipeline, options)
    api = gradio_app_kwargs(pipeline, options) if getattr(args, "api", False) else None  # docs/serving.md
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, app_kwargs=api, **launch_style())
    return 0


if __name__ == "__main__":
    sys.exit(main())
