"""Figures and renderers (HTML, Markdown, JSON) for audit results."""

__all__: list[str] = []
