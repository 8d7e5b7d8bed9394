"""Request sets for the benchmark: seeded random English words, or a JSONL file.

The standard workload (shared/BENCHMARKS.md) is one user message of 48 words
drawn with a fixed seed from the embedded list below, ``max_tokens`` 64 and
``ignore_eos``. A JSONL file holds one request per line, either
``{"prompt": "..."}`` or ``{"messages": [{"role": "user", "content": "..."}]}``,
optionally with ``"max_tokens"``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import orjson

DEFAULT_SEED = 0

WORDS = tuple("""
able about above across act add after again against age ago air all almost alone along already also
always among amount animal answer any appear apple area arm army around art ask attack autumn away
baby back bad bag ball bank base basket bear beat beautiful bed before begin behind believe bell
below best better between big bird black blood blue board boat body bone book born both bottom box
boy branch bread break bridge bright bring brother brown build burn busy buy call calm camp can
capital captain car card care carry case cat catch cause center certain chair chance change
character charge check child choose church circle city claim class clean clear climb clock close
cloth cloud coast coat cold collect color come common company compare complete condition consider
contain continue control cook cool copy corn corner correct cost cotton count country course cover
cow crop cross crowd cry current cut dance dark daughter day dead deal dear death decide deep
degree depend describe desert design develop dictionary difference difficult dinner direct
discover distant divide doctor dog dollar door double down draw dream dress drink drive drop dry
duck during dust duty each ear early earth east easy eat edge effect egg eight either electric
element else end enemy energy engine enough enter equal even evening event ever every exact
example except exercise expect experience explain eye face fact fair fall family famous far farm
fast father fear feed feel feet few field fight figure fill final find fine finger finish fire
first fish fit five flat floor flower fly follow food foot force forest forget form forward found
four free fresh friend front fruit full game garden gas gate gather gentle get gift girl give glad
glass gold good grass gray great green ground group grow guess guide hair half hall hand happen
happy hard hat head hear heart heat heavy help high hill history hold hole home hope horse hot hour
house huge human hundred hunt idea inch include industry insect instrument interest iron island
job join journey joy jump keep key kind king kitchen knee knife know lady lake land language large
last late laugh lead learn leave left leg length letter level lie life lift light line liquid list
listen little live long look lost loud love low machine main major make man many map mark market
master match material matter meal measure meat meet melody metal method middle might mile milk
mind minute miss modern moment money month moon morning mother motion mountain mouth move music
name nation natural near need neighbor never new night nine noise north nose note notice number
object ocean offer office often oil old open orange order other outside oxygen page paint pair
paper parent part party pass past path pattern pay peace people period person picture piece place
plain plan plant play please poem point poor position possible pound power practice prepare
present press pretty print problem produce product protect proud provide pull push quick quiet
race radio rain raise reach read ready real reason receive record red region remember repeat reply
rest result rich ride right ring rise river road rock roll roof room root rope rose round row rule
run safe sail salt sand save say school science score sea season seat second see seed sell send
sense sentence serve settle seven shape share sharp sheep shell shine ship shoe shop shore short
shoulder shout show side sight sign silent silver simple since sing sister sit size skill skin sky
sleep slow small smell smile snow soft soil soldier solve song sound south space speak special speed
spell spend spring square stand star start station stay steam steel step stick still stone stop
store story straight strange stream street strong student study subject sudden sugar summer sun
supply sure surface swim system table tail take talk tall teach team tell ten test thank thick
thin think third thousand three through throw tiny together tone tool top total touch toward town
track trade train travel tree triangle trip trouble truck true try tube turn twenty two type under
unit until use valley value very village visit voice vowel wait walk wall want warm wash watch water
wave way wear weather week weight well west wheel white whole wide wife wild win wind window wing
winter wire wish woman wonder wood word work world write yard year yellow young
""".split())


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: a chat message list or a completion prompt, and a token limit."""

    prompt: str
    messages: tuple[dict, ...] | None = None
    max_tokens: int = 64


def random_words(num_words: int, rng: random.Random) -> str:
    """``num_words`` words from the embedded list, space-separated."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def random_requests(num_requests: int, input_len: int = 48, output_len: int = 64,
                    seed: int = DEFAULT_SEED) -> list[RequestSpec]:
    """``num_requests`` requests of ``input_len`` random words each (same seed, same words)."""
    if input_len < 1 or output_len < 1:
        raise ValueError(f"--input-len and --output-len must be >= 1 (got {input_len}, {output_len})")
    rng = random.Random(seed)
    return [RequestSpec(prompt=random_words(input_len, rng), max_tokens=output_len)
            for _ in range(num_requests)]


def load_jsonl(path: str | Path, output_len: int = 64) -> list[RequestSpec]:
    """Read requests from a JSONL file; ``output_len`` applies where a line has no max_tokens."""
    specs = []
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            if line.strip():
                specs.append(_parse_line(line, output_len, f"{path}:{line_number}"))
    if not specs:
        raise ValueError(f"{path} holds no requests (expected one JSON object per line)")
    return specs


def _parse_line(line: bytes, output_len: int, where: str) -> RequestSpec:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object with 'prompt' or 'messages'")
    max_tokens = int(record.get("max_tokens", output_len))
    if "messages" in record:
        messages = tuple(record["messages"])
        text = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return RequestSpec(prompt=text, messages=messages, max_tokens=max_tokens)
    if "prompt" in record:
        return RequestSpec(prompt=str(record["prompt"]), max_tokens=max_tokens)
    raise ValueError(f"{where}: expected a 'prompt' or 'messages' field")


def cycle_to(specs: list[RequestSpec], num_requests: int) -> list[RequestSpec]:
    """Repeat ``specs`` in order until there are ``num_requests`` of them."""
    if not specs:
        raise ValueError("no requests to send")
    return [specs[i % len(specs)] for i in range(num_requests)]
