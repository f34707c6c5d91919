"""Shell completion for ``delegate-agent``, generated from its argparse parser (bash and zsh).

The parser is walked once into a table: for each command path (``""``, ``"connector"``,
``"connector apply"``) its subcommands with their help, its options, and for each option that
takes a value what completes it (its choices, files, directories, or nothing). Both scripts are
that table as ``case`` statements plus one small function that finds the command path in the
words typed so far, so a command or flag added to the parser completes without touching this.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field


@dataclass
class _Command:
    subcommands: dict[str, str] = field(default_factory=dict)  # name -> help
    options: dict[str, str] = field(default_factory=dict)  # flag -> help
    values: dict[str, str] = field(default_factory=dict)  # flag -> "@files", "@dirs", "@any" or words


def _value_kind(action: argparse.Action) -> str:
    if action.choices is not None:
        return " ".join(str(c) for c in action.choices)
    if action.metavar == "DIR" or action.dest.endswith("_dir"):
        return "@dirs"
    if action.metavar == "FILE" or action.dest == "file" or action.dest.endswith("_file"):
        return "@files"
    return "@any"


def _walk(parser: argparse.ArgumentParser, path: str, table: dict[str, _Command]) -> None:
    command = table.setdefault(path, _Command())
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, child in action.choices.items():
                command.subcommands[name] = helps.get(name, "")
                _walk(child, f"{path} {name}".strip(), table)
        elif not action.option_strings and action.choices is not None:  # `completion bash|zsh`
            command.subcommands.update({str(c): action.help or "" for c in action.choices})
        elif action.option_strings and action.help != argparse.SUPPRESS:
            for flag in action.option_strings:
                command.options[flag] = (action.help or "").split(" (", 1)[0]
                if action.nargs != 0:
                    command.values[flag] = _value_kind(action)


def command_table(parser: argparse.ArgumentParser) -> dict[str, _Command]:
    """Every command path of ``parser`` with what completes there."""
    table: dict[str, _Command] = {}
    _walk(parser, "", table)
    return table


def _q(text: str) -> str:
    return shlex.quote(text)


def _cases(name: str, lines_for: dict[str, list[str]]) -> list[str]:
    """A shell function printing, for the command path in $1, the lines given for it."""
    out = [f"{name}() {{", '    case "$1" in']
    for path, lines in lines_for.items():
        if lines:
            out.append(f"        {_q(path)}) printf '%s\\n' {' '.join(_q(x) for x in lines)} ;;")
    out += ["    esac", "}"]
    return out


def _values_case(table: dict[str, _Command], name: str) -> list[str]:
    """A shell function printing what completes the value of option $2 under command path $1."""
    out = [f"{name}() {{", '    case "$1|$2" in']
    for path, command in table.items():
        for flag, kind in command.values.items():
            out.append(f"        {_q(f'{path}|{flag}')}) printf '%s\\n' {_q(kind)} ;;")
    out += ["    esac", "}"]
    return out


def _tables(table: dict[str, _Command], prefix: str, *, described: bool) -> list[str]:
    def entry(word: str, text: str) -> str:
        return f"{word.replace(':', chr(92) + ':')}:{text}" if described else word

    subs = {p: [entry(n, h) for n, h in c.subcommands.items()] for p, c in table.items()}
    opts = {p: [entry(f, h) for f, h in c.options.items()] for p, c in table.items()}
    names = {p: list(c.subcommands) for p, c in table.items()}
    return [
        *(_cases(f"{prefix}_subs", subs) if described else []),  # bash shows no descriptions
        *_cases(f"{prefix}_names", names),
        *_cases(f"{prefix}_opts", opts),
        *_values_case(table, f"{prefix}_value"),
    ]


# The command path: the words before the cursor that name a subcommand of the path so far,
# skipping options and the value after an option that takes one. Shared by both shells.
_PATH = """\
__delegate_agent_path() {
    # $1: how many words precede the cursor, the program's name included; those words follow.
    local n=$(($1 - 1)) w cmdpath="" skip="" names
    shift 2
    while ((n > 0)); do
        w=$1
        shift
        n=$((n - 1))
        if [[ -n $skip ]]; then skip=""; continue; fi
        if [[ $w == -* ]]; then
            [[ $w != *=* && -n $(__delegate_agent_value "$cmdpath" "$w") ]] && skip=1
            continue
        fi
        names=$'\\n'"$(__delegate_agent_names "$cmdpath")"$'\\n'
        [[ $names == *$'\\n'"$w"$'\\n'* ]] && cmdpath=${cmdpath:+$cmdpath }$w
    done
    printf '%s' "$cmdpath"
}
"""

_BASH = """\
# bash completion for delegate-agent; generated by `delegate-agent completion bash`.
# Use: eval "$(delegate-agent completion bash)" (in ~/.bashrc).
{tables}
{path}
_delegate_agent() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}} cmdpath kind
    cmdpath=$(__delegate_agent_path "$COMP_CWORD" "${{COMP_WORDS[@]}}")
    COMPREPLY=()
    kind=$(__delegate_agent_value "$cmdpath" "$prev")
    if [[ $prev == -* && -n $kind ]]; then
        case $kind in
            @files) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;
            @dirs) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur")) ;;
            @any) ;;
            *) COMPREPLY=($(compgen -W "$kind" -- "$cur")) ;;
        esac
    elif [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$(__delegate_agent_opts "$cmdpath")" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$(__delegate_agent_names "$cmdpath")" -- "$cur"))
    fi
}}
complete -F _delegate_agent delegate-agent
"""

_ZSH = """\
#compdef delegate-agent
# zsh completion for delegate-agent; generated by `delegate-agent completion zsh`.
# Use: delegate-agent completion zsh > "${{fpath[1]}}/_delegate-agent" (then a new shell),
# or: source <(delegate-agent completion zsh)
{tables}
{path}
_delegate_agent() {{
    # (never a variable named path in zsh: it is $PATH)
    local cur=${{words[CURRENT]}} prev=${{words[CURRENT-1]}} cmdpath kind
    local -a items
    cmdpath=$(__delegate_agent_path $((CURRENT - 1)) "${{words[@]}}")
    kind=$(__delegate_agent_value "$cmdpath" "$prev")
    if [[ $prev == -* && -n $kind ]]; then
        case $kind in
            @files) _files ;;
            @dirs) _files -/ ;;
            @any) _message 'value' ;;
            *) compadd -- ${{=kind}} ;;
        esac
    elif [[ $cur == -* ]]; then
        items=("${{(@f)$(__delegate_agent_opts "$cmdpath")}}")
        _describe -t options 'option' items
    else
        items=("${{(@f)$(__delegate_agent_subs "$cmdpath")}}")
        (( ${{#items}} )) && [[ -n ${{items[1]}} ]] && _describe -t commands 'command' items
    fi
}}
if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _delegate_agent "$@"
else
    compdef _delegate_agent delegate-agent
fi
"""


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script for ``shell`` (``bash`` or ``zsh``)."""
    table = command_table(parser)
    if shell == "bash":
        return _BASH.format(tables="\n".join(_tables(table, "__delegate_agent", described=False)), path=_PATH)
    if shell == "zsh":
        return _ZSH.format(tables="\n".join(_tables(table, "__delegate_agent", described=True)), path=_PATH)
    raise ValueError(f"no completion for {shell!r}: bash or zsh")
