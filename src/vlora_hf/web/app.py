"""The Gradio page: an image (uploaded or one of the shipped examples), questions about it, and what it changed.

An image's perceptual weights are computed once, when it is chosen, and kept in the visitor's session: every
question about it (in chat mode, with the earlier turns in the prompt) runs only the LLM. Errors from the
processor appear in place of the answer and leave the page usable.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from .session import Answer, DemoSession, ImageWeights

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SESSIONS = 64
MAX_UPLOAD = "50mb"  # the processor's decompression-bomb guard covers small files that decode to huge images
# System fonts only: the default theme would make every visitor's browser fetch fonts from Google.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
INTRO = """# VLoRA: the image becomes weights
The image never enters the LLM's sequence: a small generator turns it into low-rank deltas for the LLM's
projections, computed once per image. Ask as many questions as you like about it; the heat map shows the size
of each delta it added, per receiving layer and projection."""


def _image_timing(image: ImageWeights) -> str:
    return f"**tower + generator:** {image.seconds * 1e3:.1f} ms for {image.name}, once (every question reuses them)"


def _answer_timing(image: ImageWeights, answer: Answer) -> str:
    return (f"{_image_timing(image)}  \n**LLM:** {answer.seconds * 1e3:.1f} ms "
            f"({answer.prompt_tokens} prompt tokens, {answer.new_tokens} new)")


def _chat(turns: list[tuple[str, str]]) -> list[dict]:
    return [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


class Handlers:
    """The page's event handlers: each turns widget values into widget updates through the session."""

    def __init__(self, session: DemoSession, examples: list[Path]):
        self.session, self.examples = session, examples

    def choose(self, path, second):
        """-> current image, preview, answer, turns, chat, timings, plot (an error clears the current image)."""
        try:
            current = self.session.image_weights(path)
        except ValueError as err:
            return None, None, f"Error: {err}", [], [], "", None
        plot = self.session.delta_plot([image for image in (current, second) if image is not None])
        return current, current.image, "", [], [], _image_timing(current), plot

    def pick_example(self, second, evt: gr.SelectData):
        return self.choose(self.examples[evt.index], second)

    def compare(self, path, current):
        """-> second image, plot, answer (an error there leaves the first image's plot alone)."""
        second, error = None, gr.skip()
        if path is not None:  # None: the second image was cleared
            try:
                second = self.session.image_weights(path)
            except ValueError as err:
                error = f"Error: {err}"
        shown = [image for image in (current, second) if image is not None]
        return second, self.session.delta_plot(shown) if shown else None, error

    def ask(self, current, turns, question, chat_mode, max_new_tokens, do_sample, temperature):
        """-> answer, turns, chat, timings."""
        if current is None:
            return "Error: upload an image or click an example first.", gr.skip(), gr.skip(), gr.skip()
        earlier = turns if chat_mode else []  # the last turn is kept anyway: chat mode may start from it
        try:
            answer = self.session.answer(current, question, earlier, max_new_tokens, do_sample, temperature)
        except ValueError as err:
            return f"Error: {err}", gr.skip(), gr.skip(), gr.skip()
        turns = [*earlier, (question.strip(), answer.text)]
        return answer.text, turns, _chat(turns), _answer_timing(current, answer)


def build_app(session: DemoSession) -> gr.Blocks:
    """The page: its widgets in Gradio's layout order, then the events that connect them to `Handlers`."""
    examples = sorted(EXAMPLES.glob("shapes_*.png"))
    on = Handlers(session, examples)
    with gr.Blocks(title="VLoRA demo", analytics_enabled=False) as app:
        current, second, turns = gr.State(None), gr.State(None), gr.State([])
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column():
                image_file = gr.File(label="Upload an image", elem_id="upload")
                gallery = gr.Gallery([str(p) for p in examples], label="… or click an example", columns=4,
                                     height=200, allow_preview=False, elem_id="examples")
                preview = gr.Image(label="Image", type="pil", format="png", interactive=False, height=160,
                                   elem_id="preview")
            with gr.Column():
                question = gr.Textbox(session.default_prompt, label="Question", elem_id="question")
                chat_mode = gr.Checkbox(False, label="Chat mode: earlier questions about this image go into the prompt",
                                        elem_id="chat-mode")
                ask_button = gr.Button("Ask", variant="primary", elem_id="ask")
                answer = gr.Textbox(label="Answer", interactive=False, elem_id="answer")
                chat = gr.Chatbot(label="Conversation", height=220, visible=False, elem_id="chat")
                timings = gr.Markdown(elem_id="timings")
                with gr.Accordion("Generation options", open=False):
                    max_new_tokens = gr.Slider(1, 256, value=64, step=1, label="Max new tokens")
                    do_sample = gr.Checkbox(False, label="Sample (instead of greedy decoding)")
                    temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature (when sampling)")
        gr.Markdown("## What the image changed: ‖A·Bᵀ‖ per receiving layer and target")
        with gr.Row():
            plot = gr.Image(label="Delta norms", type="pil", format="png", interactive=False, elem_id="delta-plot",
                            scale=3)
            compare_file = gr.File(label="Second image to compare (optional)", elem_id="upload2", scale=1)

        chosen = [current, preview, answer, turns, chat, timings, plot]
        image_file.upload(on.choose, [image_file, second], chosen)
        gallery.select(on.pick_example, [second], chosen)
        compare_file.upload(on.compare, [compare_file, current], [second, plot, answer])
        compare_file.clear(on.compare, [compare_file, current], [second, plot, answer])
        asking = dict(fn=on.ask, inputs=[current, turns, question, chat_mode, max_new_tokens, do_sample, temperature],
                      outputs=[answer, turns, chat, timings])
        ask_button.click(**asking)
        question.submit(**asking)
        chat_mode.change(lambda on, done: gr.update(visible=on, value=_chat(done)), [chat_mode, turns], [chat])
    return app


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, **kwargs):
    """Serve on host:port; never a public share link, no server-side rendering, no MCP endpoint.

    Each visitor's session holds its images' weights (tens of MB each for a 7B model): the least recently used
    sessions beyond SESSIONS are dropped."""
    return app.launch(server_name=host, server_port=port, share=False, ssr_mode=False, mcp_server=False,
                      max_file_size=MAX_UPLOAD, state_session_capacity=SESSIONS, theme=THEME, **kwargs)
