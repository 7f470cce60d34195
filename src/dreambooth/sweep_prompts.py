"""The prompts a sweep file names, filled in one way for the sweep that renders them and the report that reads them.

A leaf module (no torch, no diffusers): the report imports it without importing the sweep, which sits upstream.
"""

from __future__ import annotations


def fill_prompt(template: str, identifier: str, class_name: str) -> str:
    """A sweep prompt with `{id}` replaced by the identifier (the subject's word) and `{class}` by the class noun."""
    return template.replace("{id}", identifier).replace("{class}", class_name)


def plain_class_prompt(class_prompt: str | None, class_name: str | None) -> str | None:
    """The prompt whose images measure PRES: the training class prompt, else "a photo of a <class>" (None: neither)."""
    if class_prompt:
        return class_prompt
    return f"a photo of a {class_name}" if class_name else None
