"""vlkd: image URLs with captions in, a CLIP-distilled generative vision-language model out.

    from vlkd import load_model
    model = load_model("data/model")            # the packaged student, its teacher and language model
    model.answer(["cat.jpg"], ["What color is the cat?"])
    model.caption(["cat.jpg"])
"""

__version__ = "0.1.0"
__all__ = ["load_model"]


def __getattr__(name: str):
    # Imported on first use: `import vlkd` (the CLI, DVC's stages) stays free of torch and transformers.
    if name == "load_model":
        from vlkd.inference.model import load_model

        return load_model
    raise AttributeError(f"module 'vlkd' has no attribute {name!r}")
