"""Chat templates for models whose files carry none (a GGUF converted without one).

Written for membound from the model cards' descriptions of the turn format; a template in the file
always wins over these.
"""

from __future__ import annotations

# Gemma 3: <start_of_turn>{user|model}\n...<end_of_turn>\n turns after <bos>; there is no system role,
# so a system message goes at the top of the first user turn, and an assistant turn is the "model" role.
GEMMA3 = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}"
    "{% if not loop.first %}{{ raise_exception('a system message may only come first') }}{% endif %}"
    "{% set ns.system = m['content'] | trim + '\\n\\n' %}"
    "{% else %}"
    "{% if m['role'] not in ('user', 'assistant') %}"
    "{{ raise_exception('roles must be system, user or assistant, got ' + m['role']) }}"
    "{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\\n' }}"
    "{% if m['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

# By GGUF `general.architecture`.
FALLBACK_TEMPLATES = {"gemma3": GEMMA3}
