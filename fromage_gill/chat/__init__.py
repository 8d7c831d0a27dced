"""The chat app's logic without gradio (``app.py`` is its layout and wiring). One concept per module:

handlers.py   ChatHandlers: one method per button / API endpoint (send, regenerate, edit, stop, undo, clear,
              export, load, history, new chat, open, restore), on plain values, returning or yielding a Reply
session.py    ChatSession: one tab's conversation (the engine's Chat, notes to toast, the answer being streamed)
running.py    a turn's events folded into its session from a worker thread (so image progress shows live)
kept.py       the handlers of stored conversations: save, restore (only to its owner), list, open
store.py      ConversationStore: conversations per owner in SQLite or PostgreSQL, images as files, a time-to-live
store_files.py  the store's private folders and files, written atomically
store_migrate.py  the one-time move of earlier versions' JSON conversation files into the database
records.py    a session as the record the store keeps, and back
owner.py      OwnerTokens: owner ids signed with a key only the server holds
gate.py       ModelGate: the FIFO queue in front of the model ("Busy: N ahead of you")
messages.py   text + attached files -> a message for Chat.send; a session -> the chat's messages
labels.py     the line under an image: Retrieved (score, caption, source) / Generated (seed), decision
export.py     export as JSON / HTML, reading a JSON export back (ChatExportError, size limits)
controls.py   the settings controls: help lines, defaults, ranges the model allows, GenerationSettings
options.py    AppOptions, the app's command-line flags, loading the model, its indexes and --clip
page.py       the header and the example messages
"""
