"""A generated corpus of realistic agent memories and held-out queries (deterministic per seed)."""

from __future__ import annotations

import random

PEOPLE = ["Alice", "Bob", "Chen", "Dana", "Emeka", "Fatima", "Gus", "Hana", "Ivan", "Jade"]
FOODS = [
    "Thai green curry",
    "sourdough bread",
    "ramen",
    "vegan tacos",
    "grilled salmon",
    "mushroom risotto",
    "falafel wraps",
    "pho",
    "lentil soup",
    "margherita pizza",
    "sushi",
    "chickpea stew",
]
PLACES = ["Lyon", "Kyoto", "Lisbon", "Nairobi", "Montreal", "Oslo", "Buenos Aires", "Seoul", "Porto", "Cape Town"]
HOBBIES = [
    "trail running",
    "the violin",
    "bouldering",
    "watercolour painting",
    "chess",
    "sailing",
    "birdwatching",
    "pottery",
    "salsa dancing",
    "woodworking",
    "photography",
    "gardening",
]
JOBS = [
    "an ICU nurse",
    "a Rust engineer",
    "a maths teacher",
    "a data analyst",
    "a pastry chef",
    "an architect",
    "a bus driver",
    "a pharmacist",
    "a product designer",
    "a journalist",
]
TOOLS = [
    "the calendar",
    "the grocery list",
    "the budget sheet",
    "the travel planner",
    "the pill reminder",
    "the code review checklist",
    "the packing list",
    "the meal planner",
]

SEMANTIC = [
    "{p} loves {food} and cooks it most weekends.",
    "{p} works as {job} in {place}.",
    "{p} has been practising {hobby} for {n} years.",
    "{p} is allergic to {food} and avoids it at restaurants.",
    "{p} moved to {place} in {year} and rents a flat near the river.",
    "{p} prefers short answers and dislikes long explanations about {hobby}.",
]
EPISODIC = [
    "user: Can you suggest a quick {food} recipe for tonight?",
    "assistant: I added {food} to {tool} for Thursday.",
    "user: I'm flying to {place} on the {n}th, remind me to pack.",
    "user: My knee hurts after {hobby} yesterday.",
    "assistant: Your appointment as {job} trainee mentor is confirmed for {year}.",
    "user: What did I say about {hobby} last week?",
]
PROCEDURAL = [
    "To plan meals: open {tool}, pick {food}, check allergies, order groceries.",
    "Before travel to {place}: check passport, update {tool}, book the airport train.",
    "Weekly review: export {tool}, compare with last week, flag anything over budget.",
    "When asked about {hobby}: check the injury notes first, then suggest a light session.",
    "Shift-week routine for {job}: batch cook {food} on Sunday, freeze portions, label by day.",
    "Deploy steps: run the tests, tag the release, update {tool}, announce in the channel.",
]
QUERIES = [
    "what should I make for dinner with {food}?",
    "when is my trip to {place}?",
    "how long have I been doing {hobby}?",
    "any foods I must avoid?",
    "how do I usually prepare for a trip?",
    "what is my job again?",
    "remind me how the weekly review works",
    "which city do I live in now?",
]
TEMPLATES = {"long_term_memory": SEMANTIC, "conversation_memory": EPISODIC, "workflow_memory": PROCEDURAL}


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        p=rng.choice(PEOPLE),
        food=rng.choice(FOODS),
        place=rng.choice(PLACES),
        hobby=rng.choice(HOBBIES),
        job=rng.choice(JOBS),
        tool=rng.choice(TOOLS),
        n=rng.randint(2, 28),
        year=rng.randint(2012, 2026),
    )


def memories(memory_type: str, count: int, seed: int) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    seen: set[str] = set()
    while len(out) < count:
        text = _fill(rng.choice(TEMPLATES[memory_type]), rng) + f" (note {len(out)})"
        if text in seen:
            continue
        seen.add(text)
        out.append({"content": text, "importance": round(rng.random(), 2)})
    return out


def queries(count: int, seed: int) -> list[str]:
    """Distinct queries that are not in the corpus (each is used once, so the caches stay cold)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < count:
        out.append(_fill(rng.choice(QUERIES), rng) + f" #{len(out)}")
    return out
