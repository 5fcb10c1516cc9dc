"""Deterministic synthetic domains for the demo corpus.

Two domains whose structure differs sharply from prose and code, so that experts have something to specialise on:
``tools`` (JSON tool-call transcripts) and ``math`` (arithmetic with worked answers). Every document is a pure
function of ``(seed, index)``, so the same bytes come out on every machine.
"""

from __future__ import annotations

import json
import random

CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Perth", "Dakar", "Hanoi", "Bern", "Accra",
          "Tunis", "Porto", "Leeds", "Kyiv", "Minsk", "Delhi", "Seoul", "Austin", "Denver", "Boston", "Nairobi"]
NAMES = ["Ada", "Bo", "Chen", "Dara", "Eli", "Femi", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea", "Mo", "Nia", "Omar",
         "Pia", "Quin", "Rui", "Sol", "Tao", "Uma", "Vik", "Wen", "Xia", "Yara", "Zed"]
ITEMS = ["laptop", "kettle", "bicycle", "lamp", "desk", "camera", "guitar", "backpack", "printer", "monitor",
         "blender", "tent", "scooter", "headphones", "router", "drill"]
UNITS = ["celsius", "fahrenheit"]
CURRENCIES = ["EUR", "USD", "JPY", "GBP", "CHF", "NGN", "INR", "KRW"]


def _weather(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    city, unit = rng.choice(CITIES), rng.choice(UNITS)
    temp = rng.randint(-10, 38) if unit == "celsius" else rng.randint(14, 100)
    ask = rng.choice(["What is the weather in {c}?", "Is it cold in {c} right now?", "Weather for {c}, please.",
                      "How warm is it in {c} today?"]).format(c=city)
    result = {"city": city, "temperature": temp, "unit": unit, "sky": rng.choice(["clear", "rain", "cloudy", "snow"])}
    answer = f"It is {temp} degrees {unit} in {city} with {result['sky']} skies."
    return ask, "get_weather", {"city": city, "unit": unit}, result, answer


def _convert(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    src, dst = rng.sample(CURRENCIES, 2)
    amount = rng.randint(1, 5000)
    rate = round(rng.uniform(0.01, 150.0), 4)
    ask = rng.choice(["Convert {a} {s} to {d}.", "How much is {a} {s} in {d}?", "I have {a} {s}; what is that in {d}?"])
    ask = ask.format(a=amount, s=src, d=dst)
    value = round(amount * rate, 2)
    return ask, "convert_currency", {"amount": amount, "from": src, "to": dst}, {"rate": rate, "value": value}, \
        f"{amount} {src} is {value} {dst} at a rate of {rate}."


def _order(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    qty = rng.randint(1, 9)
    order_id = f"ORD-{rng.randint(10000, 99999)}"
    ask = rng.choice(["Order {q} {i} for {n}.", "{n} needs {q} {i}, can you place the order?",
                      "Please buy {q} {i} and ship them to {n}."]).format(q=qty, i=item, n=name)
    status = rng.choice(["confirmed", "backordered", "shipped"])
    return ask, "place_order", {"customer": name, "item": item, "quantity": qty}, \
        {"order_id": order_id, "status": status}, f"Order {order_id} for {qty} {item} is {status}."


def _calendar(rng: random.Random) -> tuple[str, str, dict, dict, str]:
    who = rng.sample(NAMES, rng.randint(2, 4))
    day = rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"])
    hour = rng.randint(8, 17)
    ask = f"Book a meeting with {', '.join(who)} on {day} at {hour}:00."
    ok = rng.random() < 0.7
    result = ({"booked": ok, "room": f"R{rng.randint(100, 499)}"} if ok
              else {"booked": False, "conflict": rng.choice(who)})
    answer = (f"Booked room {result['room']} on {day} at {hour}:00." if ok
              else f"{result['conflict']} is busy on {day} at {hour}:00; pick another time.")
    return ask, "create_event", {"attendees": who, "day": day, "hour": hour}, result, answer


TOOLS = [_weather, _convert, _order, _calendar]


def tool_transcript(seed: int, index: int) -> str:
    """One JSON-lines transcript of 1-4 tool-using turns."""
    rng = random.Random(seed * 1_000_003 + index)
    lines = [json.dumps({"role": "system", "content": "You can call tools. Answer briefly."})]
    for _ in range(rng.randint(1, 4)):
        ask, name, args, result, answer = rng.choice(TOOLS)(rng)
        call_id = f"call_{rng.randint(0, 16**6):06x}"
        lines.append(json.dumps({"role": "user", "content": ask}))
        lines.append(json.dumps({"role": "assistant", "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]}))
        lines.append(json.dumps({"role": "tool", "tool_call_id": call_id, "content": result}))
        lines.append(json.dumps({"role": "assistant", "content": answer}))
    return "\n".join(lines) + "\n"


def _expr(rng: random.Random, depth: int) -> tuple[str, int, list[str]]:
    """A random expression, its value, and the worked steps (innermost first)."""
    if depth == 0 or rng.random() < 0.3:
        v = rng.randint(1, 99)
        return str(v), v, []
    op = rng.choice("+-*")
    ls, lv, lsteps = _expr(rng, depth - 1)
    rs, rv, rsteps = _expr(rng, depth - 1)
    value = lv + rv if op == "+" else lv - rv if op == "-" else lv * rv
    steps = lsteps + rsteps + [f"{lv} {op} {rv} = {value}"]
    return f"({ls} {op} {rs})", value, steps


def math_problem_set(seed: int, index: int) -> str:
    """A small worksheet of arithmetic problems with worked answers."""
    rng = random.Random(seed * 2_000_003 + index)
    parts = []
    for n in range(rng.randint(2, 5)):
        kind = rng.random()
        if kind < 0.6:
            text, value, steps = _expr(rng, rng.randint(1, 3))
            text = text[1:-1] if text.startswith("(") else text
            work = "; ".join(steps) if steps else f"{value}"
            parts.append(f"Problem {n + 1}: compute {text}.\nWork: {work}.\nAnswer: {value}\n")
        elif kind < 0.8:
            a, b = rng.randint(2, 40), rng.randint(2, 12)
            price = rng.randint(1, 30)
            parts.append(f"Problem {n + 1}: {rng.choice(NAMES)} buys {a} boxes of {b} {rng.choice(ITEMS)}s at "
                         f"{price} each.\nWork: {a} * {b} = {a * b}; {a * b} * {price} = {a * b * price}.\n"
                         f"Answer: {a * b * price}\n")
        else:
            a, b = rng.randint(100, 9999), rng.randint(2, 60)
            q, r = divmod(a, b)
            parts.append(f"Problem {n + 1}: divide {a} by {b}.\nWork: {b} * {q} = {b * q}; {a} - {b * q} = {r}.\n"
                         f"Answer: {q} remainder {r}\n")
    return "\n".join(parts)
