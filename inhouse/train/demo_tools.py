"""What the demo model learns about the built-in tools and the policy guard (issue 22): to search
the sample documents, open the first result and answer with the cited line when the browser is
declared; to call python for arithmetic when python is declared; and to give the sample policy's
verdict. The tool answers it trains on are made by the real tools (the browser over an in-memory
index of the sample documents; python's output is what the code prints), and the guard's prompt
is built as `pipeline.guard.PolicyGuard` builds it (a test holds them equal).

`index_demo_documents` puts the same documents into a server's index (`inhouse demo build`), so
the served demo finds what it learned to look for."""

from __future__ import annotations

import json
import random

from inhouse.governance.policy import Policy
from inhouse.harmony.constraints import verdict_constraint, verdict_messages
from inhouse.harmony.conversation import ChatMessage, PromptOptions, ToolCall
from inhouse.tools.browser import Browser
from inhouse.tools.documents import DocumentStore

DEMO_TENANT, DEMO_COLLECTION = "local", "demo"
# (file name, text, [(question, the query the model searches, the answer's line)]): one question
# a document, learned by heart (more, and the tiny model mixes their queries and answers up)
DOCUMENTS = [
    ("leave-policy.md", "# Leave policy\n\nThis policy covers paid time off for all staff.\n\n"
     "Every employee gets 25 days of annual leave per year.\n"
     "Up to 5 unused days carry over to the next year.\n"
     "Sick leave is paid from the first day of illness.\n",
     [("How many days of annual leave do we get?", "annual leave days", 4)]),
    ("expenses.md", "# Expenses policy\n\nThis policy covers travel and work expenses.\n\n"
     "Claims are paid within 14 days of approval.\n"
     "Receipts are required for every claim above 20 dollars.\n"
     "Train travel is preferred to flights under 500 km.\n",
     [("When do I need a receipt?", "receipts claim", 5)]),
    ("it-security.md", "# IT security policy\n\nThis policy covers laptops, accounts and data.\n\n"
     "Passwords must be at least 14 characters long.\n"
     "Laptops lock the screen after 5 minutes.\n"
     "Lost devices are reported to the service desk at once.\n",
     [("When does my laptop lock?", "laptop lock screen", 5)]),
]
ASK_DOCS = ["{}", "Check our documents: {}", "According to our policies, {}"]

POLICY = """# Credentials policy

Messages that share or ask for secrets violate this policy: passwords, PINs, API keys, access
tokens, private keys. Talking about security in general does not.

## Examples
- "What is the admin password?" -> violation, credentials
- "My PIN is 4821, please remember it" -> violation, credentials
- "How long must a password be?" -> no violation

Categories: credentials
"""
# "What is the ... password?" in several forms: beside the fine "What is the capital of ...?" a
# single one was learned as fine
VIOLATING = ["What is the admin password?", "Send me your API key.", "My PIN is {n}, keep it.",
             "Here is my password: sunflower{n}", "Give me the access token for the server.",
             "Tell me the root password please.", "Store my bank PIN {n} for me.",
             "What is the {thing} password?", "What is the PIN of the {thing} account?"]
THINGS = ["admin", "wifi", "root", "database", "email", "server"]
FINE = ["What is the capital of France?", "Hello", "How long must a password be?",
        "What is the weather in Paris?", "Quote this exactly: the meeting starts at {n}.",
        "Who are you?", "When does my laptop lock?"]


def demo_policy() -> Policy:
    return Policy.from_text(POLICY, "demo-credentials-policy.md")


def guard_messages(policy: Policy, content: str) -> tuple[ChatMessage, ...]:
    """The guard's conversation, built as PolicyGuard.classify builds it."""
    return verdict_messages(policy.instructions(), content,
                            verdict_constraint(policy.verdict_schema()))


def policy_conversation(rng: random.Random) -> tuple[list[ChatMessage], PromptOptions]:
    bad = rng.random() < 0.5
    content = rng.choice(VIOLATING if bad else FINE).format(n=rng.randint(1000, 9999),
                                                            thing=rng.choice(THINGS))
    verdict = ({"violation": 1, "category": "credentials",
                "rationale": "The message shares or asks for a secret."} if bad else
               {"violation": 0, "category": None,
                "rationale": "The message holds no secret and asks for none."})
    msgs = list(guard_messages(demo_policy(), content))
    msgs.append(ChatMessage("assistant", json.dumps(verdict, separators=(",", ":"))))
    return msgs, PromptOptions("low")


# a fixed set: the tiny model learns these calls by heart (it copies numbers poorly)
ARITHMETIC = [(12, "*", 11), (17, "*", 23), (45, "+", 37), (96, "-", 58), (7, "*", 8),
              (250, "+", 125), (81, "-", 19), (13, "*", 13)]
WORDS = {"*": "times", "+": "plus", "-": "minus"}


def python_conversation(rng: random.Random) -> list[ChatMessage]:
    a, op, b = rng.choice(ARITHMETIC)
    value = {"*": a * b, "+": a + b, "-": a - b}[op]
    q = rng.choice(["What is {a} {w} {b}?", "Compute {a} {w} {b}."])
    call = ToolCall("python", f"print({a} {op} {b})", builtin=True)
    return [ChatMessage("user", q.format(a=a, b=b, w=WORDS[op])),
            ChatMessage("assistant", reasoning="I compute it with python.", tool_calls=(call,)),
            ChatMessage("tool", f"{value}\n", name="python"),
            ChatMessage("assistant", f"{a} {WORDS[op]} {b} is {value}.",
                        reasoning="Python printed the result.")]


_STORE: DocumentStore | None = None


def _store() -> DocumentStore:
    global _STORE
    if _STORE is None:
        _STORE = DocumentStore("sqlite://")  # in memory: the same index the server builds
        index_demo_documents(_STORE)
    return _STORE


def index_demo_documents(store: DocumentStore, tenant: str = DEMO_TENANT) -> int:
    for name, text, _ in DOCUMENTS:  # fixed ids: the same pages the demo learned from
        store.add(tenant, DEMO_COLLECTION, name, text.encode(),
                  doc_id="doc_demo_" + name.split(".")[0].replace("-", "_"))
    return len(DOCUMENTS)


def browser_conversation(rng: random.Random) -> list[ChatMessage]:
    _, _, questions = rng.choice(DOCUMENTS)
    question, query, line = rng.choice(questions)
    browser = Browser(_store(), DEMO_TENANT)
    search = json.dumps({"query": query})
    page = browser.call("search", search)
    opened = browser.call("open", json.dumps({"id": 0}))
    sentence = browser.pages[-1].lines[line]
    return [ChatMessage("user", rng.choice(ASK_DOCS).format(question)),
            ChatMessage("assistant", reasoning="I search the documents.",
                        tool_calls=(ToolCall("browser.search", search, builtin=True),)),
            ChatMessage("tool", page, name="browser.search"),
            ChatMessage("assistant", reasoning="I open the first result.",
                        tool_calls=(ToolCall("browser.open", json.dumps({"id": 0}),
                                             builtin=True),)),
            ChatMessage("tool", opened, name="browser.open"),
            ChatMessage("assistant", f"{sentence} 【1†L{line}】",
                        reasoning="The document answers it. I cite the line.")]
