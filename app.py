"""fromage_gill chat: a Gradio app to talk with a FROMAGe / GILL model about images, and get images back.

    python app.py                              # the published GILL model (GPU; downloads weights on first use)
    python app.py --model toy-gill             # offline demo: the toy world's GILL, trained on a CPU (checkpoints/)
    python app.py --model tiny-gill            # offline plumbing check: tiny random model, gibberish answers
    fromage-gill serve --model gill --load-8bit --port 7860

``build_demo(pipeline)`` builds the UI; the conversation logic (sessions, the model queue, export) lives in
``fromage_gill/chat_ui.py`` and the model in ``fromage_gill/generate.py``. Every button is also a named API
endpoint for ``gradio_client`` (see ``API_ENDPOINTS``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from fromage_gill.chat import export as chat_export  # noqa: E402
from fromage_gill.chat.controls import SETTINGS_HELP  # noqa: E402
from fromage_gill.chat.gate import ModelGate  # noqa: E402
from fromage_gill.chat.messages import (  # noqa: E402
    IMAGE_PLACEHOLDER,
    MAX_IMAGES_PER_MESSAGE,
    build_message,
    chatbot_messages,
    edited_message,
)
from fromage_gill.chat.session import ChatSession  # noqa: E402

logger = logging.getLogger("fromage_gill.app")

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
TOY_INDEXES = ROOT / "checkpoints" / "indexes"  # the toy world's gallery and indexes, once built
NO_INDEX = "none"
WAIT_POLL_S = 0.5  # how often a queued request refreshes its "N ahead of you" message
STREAM_EVERY_S = 0.05  # at most this often a streamed answer is re-sent to the browser

API_ENDPOINTS = ("send", "regenerate", "undo", "clear", "stop", "edit", "export_html", "export_json", "load_json",
                 "history")

CSS = """
#chatbot .message-row img { max-height: 240px; width: auto; object-fit: contain; }
#chatbot .message figcaption, #chatbot small { opacity: .8; }
#buttons button { min-width: 0; }
.setting-help { font-size: .85em; opacity: .75; margin-top: -6px; }
"""


@dataclasses.dataclass(frozen=True)
class AppOptions:
    """How the app serves: queue size, model concurrency, the indexes to choose from, default settings."""

    max_queue: int = 16
    concurrency: int = 1  # turns using the model at the same time
    indexes: Mapping[str, Any] | None = None  # name -> ImageIndex; None = the pipeline's own index
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # GenerationSettings overrides
    max_images_per_message: int = MAX_IMAGES_PER_MESSAGE
    session_ttl_s: float = 6 * 3600

    def __post_init__(self) -> None:
        if self.max_queue < 1:
            raise ValueError(f"--max-queue must be >= 1, got {self.max_queue}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")


# ---------------------------------------------------------------------------------------------------------------
# Settings: one control per GenerationSettings field the UI exposes.
# ---------------------------------------------------------------------------------------------------------------


def default_settings(pipeline, overrides: Mapping[str, Any]) -> dict[str, Any]:
    from fromage_gill.generate import GenerationSettings

    values = dataclasses.asdict(GenerationSettings.for_model(pipeline.config))
    if pipeline.config.is_random:  # the tiny offline demo: short answers and few diffusion steps keep it snappy
        values.update(max_new_tokens=24, num_inference_steps=4)
    values.update(overrides)
    return values


def supports_decoding() -> list[str]:
    """The decoding strategies the engine knows."""
    from fromage_gill.settings import DECODINGS

    return list(DECODINGS)


def settings_controls(defaults: Mapping[str, Any], index_names: list[str], decodings: list[str]) -> dict[str, Any]:
    """The settings accordion's components, keyed by the API parameter name."""
    c: dict[str, Any] = {}

    def help_(key: str) -> str:
        return SETTINGS_HELP[key]

    c["mode"] = gr.Radio(["auto", "retrieve", "generate", "text"], value=defaults["mode"], label="Images",
                         info=help_("mode"), elem_id="set_mode")
    with gr.Row():
        c["max_new_tokens"] = gr.Slider(1, 512, value=defaults["max_new_tokens"], step=1, label="Max new tokens",
                                        info=help_("max_new_tokens"), elem_id="set_max_new_tokens")
        c["temperature"] = gr.Slider(0.0, 2.0, value=defaults["temperature"], step=0.05, label="Temperature",
                                     info=help_("temperature"), elem_id="set_temperature")
        c["top_p"] = gr.Slider(0.05, 1.0, value=defaults["top_p"], step=0.05, label="Top-p", info=help_("top_p"),
                               elem_id="set_top_p")
    with gr.Row():
        c["ret_scale_factor"] = gr.Slider(0.0, 5.0, value=defaults["ret_scale_factor"], step=0.1,
                                          label="Image frequency: retrieved", info=help_("image_frequency"),
                                          elem_id="set_ret_scale")
        c["gen_scale_factor"] = gr.Slider(0.0, 5.0, value=defaults["gen_scale_factor"], step=0.1,
                                          label="Image frequency: generated", info=help_("image_frequency"),
                                          elem_id="set_gen_scale")
        c["image_logit_bias"] = gr.Slider(-20.0, 20.0, value=defaults["image_logit_bias"], step=0.5,
                                          label="Image bias", info=help_("image_logit_bias"), elem_id="set_image_bias")
        c["max_images"] = gr.Slider(0, 8, value=defaults["max_images"], step=1, label="Max images per answer",
                                    info=help_("max_images"), elem_id="set_max_images")
    with gr.Row():
        c["retrieval_candidates"] = gr.Slider(1, 20, value=defaults["retrieval_candidates"], step=1,
                                              label="Retrieval candidates", info=help_("retrieval_candidates"),
                                              elem_id="set_retrieval_candidates")
        c["guidance_scale"] = gr.Slider(1.0, 20.0, value=defaults["guidance_scale"], step=0.5, label="Guidance scale",
                                        info=help_("guidance_scale"), elem_id="set_guidance_scale")
        c["num_inference_steps"] = gr.Slider(1, 100, value=defaults["num_inference_steps"], step=1,
                                             label="Inference steps", info=help_("num_inference_steps"),
                                             elem_id="set_steps")
    with gr.Row():
        seed = defaults.get("seed")
        c["seed"] = gr.Textbox(value="random" if seed is None else str(seed), label="Seed", info=help_("seed"),
                               elem_id="set_seed")
        names = index_names or [NO_INDEX]
        c["index"] = gr.Dropdown(names, value=names[0], label="Image index", info=help_("index"),
                                 visible=len(names) > 1, elem_id="set_index")
        c["decoding"] = gr.Radio(decodings, value=defaults.get("decoding", "default"), label="Decoding",
                                 info=help_("decoding"), visible=len(decodings) > 1, elem_id="set_decoding")
    return c


def make_settings(base: Mapping[str, Any], ui: Mapping[str, Any]):
    """GenerationSettings from the UI's values (ValueError, naming the setting, when one is out of range)."""
    from fromage_gill.generate import GenerationSettings

    values = dict(base)
    for key in ("mode", "max_new_tokens", "temperature", "top_p", "ret_scale_factor", "gen_scale_factor",
                "image_logit_bias", "max_images", "retrieval_candidates", "guidance_scale", "num_inference_steps",
                "decoding"):
        if ui.get(key) is not None:
            values[key] = ui[key]
    for key in ("max_new_tokens", "max_images", "retrieval_candidates", "num_inference_steps"):
        values[key] = int(values[key])
    seed = ui.get("seed")
    seed = "random" if seed is None else str(seed).strip().lower()
    if seed in ("", "random", "none", "-1"):
        values["seed"] = None
    else:
        try:
            values["seed"] = int(seed)
        except ValueError:
            raise ValueError(f"Seed must be a whole number or 'random', got {seed!r}.") from None
    return GenerationSettings(**values)


# ---------------------------------------------------------------------------------------------------------------
# The demo.
# ---------------------------------------------------------------------------------------------------------------


def build_demo(pipeline, options: AppOptions | None = None) -> gr.Blocks:
    """The chat UI for ``pipeline``; every action is also an API endpoint named in ``API_ENDPOINTS``."""
    from fromage_gill.generate import Chat, TextDelta

    options = options or AppOptions()
    defaults = default_settings(pipeline, options.defaults)
    indexes = dict(options.indexes) if options.indexes else {}
    if not indexes and pipeline.index is not None:
        indexes = {"default": pipeline.index}
    index_names = list(indexes)
    # One Pipeline view per index (sharing the model): a session retrieves from the index its Chat was built with.
    pipelines = {name: dataclasses.replace(pipeline, index=idx) for name, idx in indexes.items()}
    pipelines = pipelines or {NO_INDEX: pipeline}
    gate = ModelGate(options.concurrency)
    decodings = supports_decoding()
    cfg = pipeline.config

    def new_session(index_name: str | None = None) -> ChatSession:
        name = index_name if index_name in pipelines else next(iter(pipelines))
        return ChatSession(Chat(pipelines[name]), index_name=name)

    def use_index(session: ChatSession, index_name: str | None) -> None:
        """Switch the index a session retrieves from, keeping its conversation."""
        if index_name not in pipelines or index_name == session.index_name:
            return
        session.chat = Chat.from_dict(pipelines[index_name], session.chat.to_dict())
        session.index_name = index_name

    def view(session: ChatSession | None):
        return [] if session is None else chatbot_messages(session)

    # -- the model-using actions (streamed) -----------------------------------------------------------------

    def run_turn(session: ChatSession, start, pending_user: list | None, keep_box: Any,
                 shown_turns: int | None = None) -> Iterator[tuple]:
        """Wait for the model (showing the queue position), stream the turn, and fold errors into the chat."""
        session.stop_requested = False
        session.start_streaming(pending_user, shown_turns)
        ticket = gate.join()
        try:
            while not gate.wait(ticket, WAIT_POLL_S):
                if session.stop_requested:
                    session.end_streaming()
                    session.note("Stopped before the model started; nothing was sent.")
                    yield session, chatbot_messages(session), keep_box
                    return
                ahead = gate.ahead(ticket)
                session.live = [f"*Busy: {ahead} ahead of you.* Your message starts when they finish "
                                f"*(press Stop to withdraw it)*"]
                yield session, chatbot_messages(session), gr.update()
            session.live = []
            yield session, chatbot_messages(session), gr.update(value=None)
            last = 0.0
            for event in start():
                session.apply(event)
                now = time.monotonic()
                if now - last >= STREAM_EVERY_S or not isinstance(event, TextDelta):
                    last = now
                    yield session, chatbot_messages(session), gr.update()
        except (ValueError, RuntimeError) as e:  # ImageError is a ValueError; the engine leaves the Chat unchanged
            logger.info("turn refused: %s", e)
            session.end_streaming()
            session.note(str(e), kind="error")
            yield session, chatbot_messages(session), keep_box
            return
        finally:
            gate.leave(ticket)
            session.end_streaming()
        yield session, chatbot_messages(session), gr.update(value=None)

    def refused(session: ChatSession):
        def still_answering():
            session.note("Still answering: wait for the answer or press Stop.", kind="error")
            yield session, chatbot_messages(session), gr.update()
        return still_answering

    def send(session: ChatSession | None, message: dict | None, **ui):
        session = session or new_session(ui.get("index"))
        yield from session.exclusive(lambda: _send(session, message, ui), refused(session))

    def _send(session: ChatSession, message: dict | None, ui: dict):
        session.clear_errors()
        message = message or {}
        try:
            use_index(session, ui.get("index"))
            settings = make_settings(defaults, ui)
            segments = build_message(message.get("text"), message.get("files"),
                                     max_images=options.max_images_per_message)
        except ValueError as e:
            session.note(str(e), kind="error")
            yield session, chatbot_messages(session), gr.update()  # the box keeps what was typed, to fix and resend
            return
        session.settings = settings
        yield from run_turn(session, lambda: session.chat.send(segments, settings), segments, gr.update())

    def regenerate(session: ChatSession | None, **ui):
        session = session or new_session(ui.get("index"))
        yield from session.exclusive(lambda: _regenerate(session, ui), refused(session))

    def _regenerate(session: ChatSession, ui: dict):
        session.clear_errors()
        if not any(t.role == "assistant" for t in session.chat.history):
            session.note("Nothing to regenerate yet: send a message first.", kind="error")
            yield session, chatbot_messages(session), gr.update()
            return
        try:
            use_index(session, ui.get("index"))
            # "Regenerate" means another answer: a fixed seed would only repeat the same one.
            settings = dataclasses.replace(make_settings(defaults, ui), seed=None)
        except ValueError as e:
            session.note(str(e), kind="error")
            yield session, chatbot_messages(session), gr.update()
            return
        session.settings = settings
        yield from run_turn(session, lambda: session.chat.regenerate(settings), None, gr.update())

    def edit(session: ChatSession | None, turn_index: float | None, text: str | None, part: int | None = None,
             **ui):
        """Branch from a past user message: replace its text (or only text segment ``part``), keep its images,
        drop what came after it, and answer again."""
        session = session or new_session(ui.get("index"))
        yield from session.exclusive(lambda: _edit(session, turn_index, text, part, ui), refused(session))

    def _edit(session: ChatSession, turn_index: float | None, text: str | None, part: int | None, ui: dict):
        session.clear_errors()
        history = session.chat.history
        try:
            i = int(turn_index) if turn_index is not None else -1
            if not (0 <= i < len(history)) or history[i].role != "user":
                users = [k for k, t in enumerate(history) if t.role == "user"]
                raise ValueError(f"Turn {turn_index} is not one of your messages (yours are turns {users}).")
            use_index(session, ui.get("index"))
            settings = make_settings(defaults, ui)
            segments = edited_message(history[i].segments, text or "", part)
        except ValueError as e:
            session.note(str(e), kind="error")
            yield session, chatbot_messages(session), gr.update()
            return
        session.settings = settings
        saved = session.chat.to_dict()

        def start():
            session.chat.truncate(i)
            try:
                yield from session.chat.send(segments, settings)
            except ValueError:
                # Refused (e.g. too long): put back the turns that truncate() removed.
                session.chat = Chat.from_dict(pipelines[session.index_name], saved)
                raise

        yield from run_turn(session, start, segments, gr.update(), shown_turns=i)

    # -- quick actions ------------------------------------------------------------------------------------------

    def stop(session: ChatSession | None):
        if session is not None:
            session.stop()
        return session

    def undo(session: ChatSession | None):
        session = session or new_session()
        session.clear_errors()
        if session.running:
            session.note("Still answering: press Stop first, then Undo.", kind="error")
        elif not session.chat.history:
            session.note("Nothing to undo.", kind="error")
        else:
            try:
                session.chat.undo()
            except ValueError as e:
                session.note(str(e), kind="error")
        return session, chatbot_messages(session)

    def clear(session: ChatSession | None):
        if session is not None:
            session.stop()
            session.close()
        session = new_session()
        return session, [], None

    def export_html(session: ChatSession | None):
        session = session or new_session()
        path = Path(tempfile.mkdtemp(prefix="fromage_gill_export_")) / "conversation.html"
        path.write_text(chat_export.export_html(session, model_name=cfg.name), encoding="utf-8")
        return str(path)

    def export_json(session: ChatSession | None):
        import json

        session = session or new_session()
        path = Path(tempfile.mkdtemp(prefix="fromage_gill_export_")) / "conversation.json"
        path.write_text(json.dumps(chat_export.export_json(session, model_name=cfg.name)), encoding="utf-8")
        return str(path)

    def load_json(session: ChatSession | None, file: Any):
        session = session or new_session()
        session.clear_errors()
        path = getattr(file, "path", None) or (file.get("path") if isinstance(file, dict) else file)
        if session.running:
            session.note("Still answering: press Stop before loading a conversation.", kind="error")
            return session, chatbot_messages(session), *[gr.update() for _ in controls]
        try:
            if not path:
                raise chat_export.ChatExportError("No file: choose a JSON file saved with 'Export JSON'.")
            data = chat_export.read_export(path)
            chat = Chat.from_dict(pipelines[session.index_name], data)
            seed = data["settings"].get("seed")
            settings = make_settings(defaults, {**data["settings"], "seed": "random" if seed is None else seed})
        except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
            msg = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
            session.note(f"Could not load the conversation: {msg}", kind="error")
            return session, chatbot_messages(session), *[gr.update() for _ in controls]
        session.chat = chat
        session.settings = settings
        session.notes = []
        session.seeds = data["seeds"]
        session.reasons = {}
        session.note(f"Loaded a conversation of {len(chat.history)} turns from {Path(str(path)).name}.")
        values = dataclasses.asdict(settings)
        updates = []
        for key in controls:
            if key == "seed":
                updates.append("random" if values["seed"] is None else str(values["seed"]))
            elif key in values:
                updates.append(values[key])
            else:
                updates.append(gr.update())
        return session, chatbot_messages(session), *updates

    def history(session: ChatSession | None):
        """The conversation as JSON-friendly data: turns (text and image labels), seeds, settings."""
        if session is None:
            return {"turns": [], "seeds": {}, "settings": {}}
        return session.summary()

    def close_session(session: ChatSession | None) -> None:
        if session is not None:
            session.stop()
            session.close()

    # -- layout -------------------------------------------------------------------------------------------------

    with gr.Blocks(title=f"fromage_gill · {cfg.name}", delete_cache=(1800, 3600)) as demo:
        state = gr.State(None, time_to_live=options.session_ttl_s, delete_callback=close_session)
        gr.Markdown(header_markdown(pipeline, index_names), elem_id="header")
        chatbot = gr.Chatbot(elem_id="chatbot", label="Conversation", height="68vh", min_height=420, editable="user",
                             group_consecutive_messages=False, buttons=["copy", "copy_all"],
                             placeholder="Attach one or more images and ask about them, or ask for a picture.")
        # No file_types filter: any file reaches the app, which explains in the chat why it cannot use it.
        message = gr.MultimodalTextbox(elem_id="message", file_count="multiple",
                                       sources=["upload"], label="Message", show_label=False, autofocus=True,
                                       placeholder="Message (attach images with the clip, paste or drop them; "
                                                   f"{IMAGE_PLACEHOLDER} places an image within the text)")
        with gr.Row(elem_id="buttons"):
            stop_btn = gr.Button("Stop", elem_id="stop", variant="stop", size="sm")
            regen_btn = gr.Button("Regenerate", elem_id="regenerate", size="sm")
            undo_btn = gr.Button("Undo", elem_id="undo", size="sm")
            clear_btn = gr.Button("Clear", elem_id="clear", size="sm")
        examples = example_messages(pipeline)
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[message], label="Examples (click, then send)",
                        elem_id="examples")
        with gr.Accordion("Settings", open=False, elem_id="settings"):
            controls = settings_controls(defaults, index_names, decodings)
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

        model_events = dict(concurrency_limit=options.max_queue, concurrency_id="model")
        io = dict(outputs=[state, chatbot, message], inputs_kwargs=controls, **model_events)
        message.submit(send, inputs=[state, message], api_name="send", **io)
        regen_btn.click(regenerate, inputs=[state], api_name="regenerate", **io)
        chatbot.retry(regenerate, inputs=[state], api_visibility="private", **io)
        edit_btn.click(edit, inputs=[state, edit_turn, edit_text], api_name="edit", **io)

        def ui_edit(session: ChatSession | None, data: gr.EditData, **ui):
            i = data.index if isinstance(data.index, int) else data.index[0]
            where = session.turn_of_message(i) if session is not None else None
            value = data.value if isinstance(data.value, str) else _text_of(data.value)
            turn, part = where if where is not None else (-1, None)
            yield from edit(session, turn, value, part, **ui)

        chatbot.edit(ui_edit, inputs=[state], api_visibility="private", **io)

        quick = dict(concurrency_limit=None)
        stop_btn.click(stop, inputs=[state], outputs=[state], api_name="stop", **quick)
        undo_btn.click(undo, inputs=[state], outputs=[state, chatbot], api_name="undo", **quick)
        clear_btn.click(clear, inputs=[state], outputs=[state, chatbot, message], api_name="clear", **quick)
        chatbot.clear(clear, inputs=[state], outputs=[state, chatbot, message], api_visibility="private", **quick)
        html_btn.click(export_html, inputs=[state], outputs=[export_file], api_name="export_html", **quick)
        json_btn.click(export_json, inputs=[state], outputs=[export_file], api_name="export_json", **quick)
        load_btn.upload(load_json, inputs=[state, load_btn], outputs=[state, chatbot, *controls.values()],
                        api_name="load_json", **quick)
        history_btn.click(history, inputs=[state], outputs=[history_json], api_name="history", **quick)
        demo.load(view, inputs=[state], outputs=[chatbot], api_visibility="private")
    demo.queue(max_size=options.max_queue, default_concurrency_limit=options.max_queue)
    return demo


def launch_style() -> dict[str, Any]:
    """``launch()`` arguments for the look (Gradio 6 takes theme and CSS at launch) and the example photos."""
    return dict(theme=gr.themes.Soft(), css=CSS, allowed_paths=[str(ASSETS), str(TOY_INDEXES)], max_file_size="50mb")


def _text_of(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return value.get("text", "") if value.get("type", "text") == "text" else ""
    return str(value or "")


def header_markdown(pipeline, index_names: list[str]) -> str:
    cfg = pipeline.config
    what = "GILL (retrieves and generates images)" if cfg.kind == "gill" else "FROMAGe (retrieves images)"
    lines = [f"## fromage_gill · `{cfg.name}` — {what}"]
    if cfg.is_random:
        lines.append("*Offline demo model with random weights: it runs anywhere in seconds, and its answers are "
                     "gibberish. Start the published model with `python app.py --model gill`.*")
    elif cfg.name.startswith("toy-"):
        lines.append("*Toy-world model trained on a CPU: it knows only its synthetic world of coloured shapes (six "
                     "shapes, six colours, plain backgrounds). Try the examples below.*")
    if pipeline.index is None and not index_names:
        lines.append("*No image index is loaded, so images can only be generated (pass `--index DIR`).*")
    return "\n\n".join(lines)


def example_messages(pipeline=None) -> list[dict[str, Any]]:
    """Example messages from the photos shipped in ``assets/`` (none when there are no photos); for a toy-world
    model, from its gallery of world images."""
    gallery = TOY_INDEXES / "toy-gallery" / "images"
    if pipeline is not None and pipeline.config.name.startswith("toy-") and gallery.is_dir():
        from fromage_gill.toy.method import gallery_scenes

        files = sorted(gallery.glob("*.png"))
        singles = [str(f) for f, s in zip(files, gallery_scenes(len(files)), strict=True) if len(s.things) == 1]
        wanted = [("What is in this image?", singles[:1]), ("Show me a photo of a green triangle.", []),
                  ("Draw a red circle.", []), ("What shape is this?", singles[1:2])]
        return [{"text": text, "files": files} for text, files in wanted if len(singles) >= 2]
    photos = {p.stem: p for p in (ASSETS / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    wanted = [("What is in this picture?", ["chelsea"]),
              ("How are these two pictures different?", ["astronaut", "rocket"]),
              ("Show me another picture like this one.", ["coffee"]),
              ("Draw a picture of a cat sleeping on a red sofa.", [])]
    return [{"text": text, "files": [str(photos[n]) for n in names]} for text, names in wanted
            if all(n in photos for n in names)]


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------


def load_indexes(specs: list[str] | None, pipeline) -> dict[str, Any]:
    """``--index`` values (``DIR`` or ``NAME=DIR``) -> {name: ImageIndex}; with none, the tiny presets' shipped
    index."""
    from fromage_gill.retrieve.index import ImageIndex, shipped_index_dir

    fingerprint = pipeline.model.retrieval_fingerprint()
    if not specs:
        shipped = shipped_index_dir(pipeline.config.name)
        if pipeline.index is None and shipped is not None:
            return {"assets": ImageIndex.load(shipped, expected_fingerprint=fingerprint)}
        return {}
    out = {}
    for spec in specs:
        name, _, directory = spec.rpartition("=")
        name = name or Path(directory).name
        out[name] = ImageIndex.load(directory, expected_fingerprint=fingerprint)
    return out


def attach_clip_from_args(pipeline, source: str) -> None:
    """``--clip``: the full CLIP that 'magic' decoding scores with; unreachable weights name the flag, not the model."""
    from fromage_gill.hub import HubUnavailableError
    from fromage_gill.magic import attach_clip

    try:
        attach_clip(pipeline, source)
    except HubUnavailableError as e:
        raise ValueError(f"--clip {source}: {e}") from e


def main(argv: list[str] | None = None) -> int:
    from fromage_gill.commands.serve import add_serve_args

    parser = argparse.ArgumentParser(prog="app.py", description="Chat with a FROMAGe / GILL model in the browser.")
    add_serve_args(parser)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    args = parser.parse_args(argv)
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    """Load the model (showing progress), then build and launch the demo. Shared by ``fromage-gill serve``."""
    from fromage_gill.commands.common import load_from_args
    from fromage_gill.hub import HubUnavailableError

    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.monotonic()
    print(f"fromage_gill: loading {args.model} (progress below; the first start downloads the weights)",
          file=sys.stderr)
    try:
        pipeline = load_from_args(args)
        indexes = load_indexes(args.index, pipeline)
        if getattr(args, "clip", None):
            attach_clip_from_args(pipeline, args.clip)
        options = AppOptions(max_queue=args.max_queue, concurrency=args.concurrency, indexes=indexes or None)
    except HubUnavailableError:
        if getattr(args, "verbose", False):
            raise
        print(f"fromage_gill: the {args.model!r} weights are not on this machine and the Hugging Face Hub is "
              f"unreachable; for the offline demo run: python app.py --model toy-gill  (details: add -v)",
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:
        if getattr(args, "verbose", False):
            raise
        print(f"fromage_gill: {e}", file=sys.stderr)
        return 2
    print(f"fromage_gill: {args.model} loaded in {time.monotonic() - t0:.0f} s; starting the app", file=sys.stderr)
    demo = build_demo(pipeline, options)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_style())
    return 0


if __name__ == "__main__":
    sys.exit(main())
