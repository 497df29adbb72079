"""Figures and renderers (HTML, Markdown) for audit results. Depends on ``attacks`` only."""

from .render import TargetArrays, render_html, render_markdown, strongest_attack

__all__ = ["TargetArrays", "render_html", "render_markdown", "strongest_attack"]
