"""Prompts that need no corpus, and general-knowledge questions the corpus does not cover, for the training mix.

The mixed recipe (``training.mix``) teaches the model when *not* to retrieve: these prompts are
answered without the query token, with the base model's own answers (self-distillation,
``training.distill``), so the fine-tuned model keeps what the base could do. General-knowledge
questions are the other side: they are retrieved for like every factual question (a model cannot
know which facts a user's index holds, least of all for documents added after training), and the
answer says that the passage does not answer it, then gives the base model's own answer, marked as
general knowledge.

Prompts are made from templates and fillers with a seeded generator, so a corpus of any size gets
the same reproducible set. The kinds (``CHAT_KINDS``): greetings and small talk, arithmetic,
instructions (how-to), rewriting and translation, creative writing, advice, and questions about the
conversation itself (a two-turn conversation whose second question refers to the first turn).

These templates are training data. The evaluation prompts of ``bench/quality.py`` are written
separately, in other words, and a test checks that none of them appears here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

CHAT_KINDS = ("greeting", "arithmetic", "instruction", "rewrite", "creative", "advice", "conversation")

_GREETINGS = ("Hello!", "Hey, how are you doing today?", "Good morning!", "Hi, nice to meet you.",
              "Hey there, what's up?", "Good evening! How has your day been?", "Hiya!", "Thanks for your help earlier!",
              "Hello, can you hear me?", "Greetings, assistant.", "Howdy!", "Hi! Are you a robot?",
              "Good afternoon, how are things?", "Thank you so much!", "See you later, goodbye!",
              "What can you help me with?", "Who are you?", "Are you having a good day?", "I'm bored. Talk to me.",
              "Yo!", "Hi again.", "Nice to talk to you.", "Can we chat for a bit?", "I just wanted to say hi.")
_NAMES = ("Maya", "Tom", "Priya", "Lukas", "Amara", "Chen", "Sofia", "Omar", "Elena", "Kofi", "Hana", "Diego")
_HOBBIES = ("painting", "running", "chess", "gardening", "baking", "photography", "cycling", "knitting",
            "playing the guitar", "birdwatching", "swimming", "hiking")
_TASKS = ("boil an egg", "make a cup of tea", "tie a tie", "write a cover letter", "change a flat bicycle tire",
          "start a vegetable garden", "learn a new language", "clean a laptop keyboard", "plan a birthday party",
          "make pancakes", "set up a budget", "prepare for a job interview", "organize a closet",
          "water houseplants properly", "write a thank-you note", "pack for a weekend trip", "make a paper airplane",
          "study for an exam", "take a good photo with a phone", "back up the files on a computer")
_SENTENCES = ("the meeting got moved to thursday because alot of people was busy",
              "I has been waiting for the bus since two hours.",
              "Our team finished the project early and the client was very happy with the result.",
              "The weather today is cold and rainy, so we stayed inside and played board games.",
              "She don't like coffee but she drink tea every morning.",
              "The new library opens next month and will have a large section for children.",
              "Please send me the report by Friday so I can review it before the meeting.",
              "We went to the beach, swam in the sea and ate ice cream on the way home.",
              "The store is closed on Sundays and opens at nine on weekdays.",
              "My brother fixed the old bicycle and now he rides it to school every day.",
              "I am very sorry for the delay, the package will arrive tomorrow.",
              "The cat sat on the windowsill and watched the birds in the garden.")
_WORDS = ("thank you", "good night", "where is the station", "I love music", "how much does it cost", "happy birthday",
          "the book is on the table", "good morning", "see you tomorrow", "I am hungry", "water", "friend")
_LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese")
_TOPICS = ("the ocean", "autumn leaves", "a rainy day", "a lost cat", "the moon", "a cup of coffee", "friendship",
           "a city at night", "the first snow", "a garden in spring", "a long train ride", "a lighthouse",
           "a birthday cake", "an old tree", "the mountains", "a quiet library")
_FORMS = ("a haiku about {t}", "a short poem about {t}", "a two-sentence story about {t}", "a limerick about {t}",
          "a short story for children about {t}", "a slogan for a cafe named after {t}", "a riddle about {t}",
          "four lines of rhyming verse about {t}")
_WORRIES = ("I can't fall asleep at night", "I procrastinate a lot", "I feel nervous before presentations",
            "I want to drink more water", "I keep forgetting my friends' birthdays", "I want to read more books",
            "my desk is always messy", "I spend too much time on my phone", "I want to save money for a trip",
            "I have trouble focusing when I study", "I want to get better at cooking", "I feel tired every afternoon",
            "I want to make new friends in a new city", "I get stressed at work")

_GENERAL = (  # (question, kind) about common knowledge, phrased as a user would; none is about a corpus document
    "What is the capital of {country}?", "Which continent is {country} in?", "What language do people speak in {country}?",
)
_COUNTRIES = ("France", "Japan", "Canada", "Italy", "Spain", "Germany", "Brazil", "Egypt", "Kenya", "Mexico", "Peru",
              "Norway", "Sweden", "India", "China", "Portugal", "Greece", "Chile", "Thailand", "Ireland", "Poland",
              "Turkey", "Vietnam", "Nigeria")
_GENERAL_FIXED = ("What is the boiling point of water in Celsius?", "How many days are there in a leap year?",
                  "What is the largest ocean on Earth?", "Which planet is closest to the Sun?",
                  "What do bees make?", "How many legs does a spider have?", "What is the freezing point of water?",
                  "What gas do plants take in from the air?", "How many continents are there?",
                  "What is the tallest animal in the world?", "What is the main ingredient of guacamole?",
                  "Who wrote Romeo and Juliet?", "What is the chemical symbol for gold?",
                  "How many hours are there in a day?", "What color do you get by mixing blue and yellow?",
                  "What is the largest mammal?", "Which organ pumps blood through the body?",
                  "How many minutes are in an hour?", "What is the opposite of hot?", "What is the square root of 81?",
                  "Which is the longest river in South America?", "What do caterpillars turn into?",
                  "What instrument has 88 keys?", "Who painted the Mona Lisa?", "What is the hardest natural substance?",
                  "How many players are on a soccer team on the field?", "What is H2O commonly called?",
                  "Which planet is known as the Red Planet?", "What is the fastest land animal?",
                  "How many strings does a standard guitar have?")


# More general questions, each with its answer: (template, ((filler, answer), ...)). The answer is not a training
# target (the base model's own answer is); it keeps out the rows whose retrieved passage happens to state it
# (``training.mix``: "the passage does not answer this" would be false there). None of the fillers or answers is
# asked about in bench/quality_sets/general.jsonl, and none names a corpus article (tests/bench/test_quality_sets.py).
GENERAL_MORE = (
    ("What is the capital of {x}?", (
        ("Austria", "Vienna"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Denmark", "Copenhagen"),
        ("Finland", "Helsinki"), ("Switzerland", "Bern"), ("Hungary", "Budapest"), ("the Czech Republic", "Prague"),
        ("Cuba", "Havana"), ("Colombia", "Bogotá"), ("Venezuela", "Caracas"), ("Morocco", "Rabat"), ("Ghana", "Accra"),
        ("Ethiopia", "Addis Ababa"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"),
        ("Pakistan", "Islamabad"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"),
        ("New Zealand", "Wellington"), ("Iceland", "Reykjavík"), ("Ukraine", "Kyiv"), ("Romania", "Bucharest"),
        ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"), ("Serbia", "Belgrade"), ("Jamaica", "Kingston"),
        ("Bolivia", "Sucre"), ("Uruguay", "Montevideo"), ("Malaysia", "Kuala Lumpur"), ("Nepal", "Kathmandu"),
        ("Bangladesh", "Dhaka"), ("Tanzania", "Dodoma"), ("Uganda", "Kampala"), ("Senegal", "Dakar"),
        ("Tunisia", "Tunis"), ("Ecuador", "Quito"), ("Mongolia", "Ulaanbaatar"))),
    ("Which currency is used in {x}?", (
        ("Switzerland", "franc"), ("India", "rupee"), ("China", "yuan"), ("Mexico", "peso"), ("Brazil", "real"),
        ("Sweden", "krona"), ("Poland", "zloty"), ("Turkey", "lira"), ("South Africa", "rand"), ("Thailand", "baht"),
        ("Norway", "krone"), ("Vietnam", "dong"), ("Nigeria", "naira"))),
    ("Who wrote {x}?", (
        ("War and Peace", "Tolstoy"), ("The Odyssey", "Homer"), ("Don Quixote", "Cervantes"),
        ("Great Expectations", "Dickens"), ("The Old Man and the Sea", "Hemingway"), ("Frankenstein", "Shelley"),
        ("Dracula", "Stoker"), ("The Divine Comedy", "Dante"), ("Les Misérables", "Hugo"), ("The Hobbit", "Tolkien"),
        ("Crime and Punishment", "Dostoevsky"), ("Jane Eyre", "Brontë"), ("The Little Prince", "Saint-Exupéry"),
        ("Treasure Island", "Stevenson"), ("Robinson Crusoe", "Defoe"), ("The Adventures of Tom Sawyer", "Twain"),
        ("Alice's Adventures in Wonderland", "Carroll"), ("The Raven", "Poe"), ("Faust", "Goethe"),
        ("The Canterbury Tales", "Chaucer"), ("Madame Bovary", "Flaubert"), ("Anna Karenina", "Tolstoy"),
        ("The Catcher in the Rye", "Salinger"), ("To Kill a Mockingbird", "Lee"), ("The Great Gatsby", "Fitzgerald"),
        ("Oliver Twist", "Dickens"), ("The Jungle Book", "Kipling"), ("Peter Pan", "Barrie"),
        ("The Adventures of Pinocchio", "Collodi"), ("The Iliad", "Homer"))),
    ("Who painted {x}?", (
        ("The Last Supper", "Leonardo"), ("The Night Watch", "Rembrandt"), ("The Scream", "Munch"),
        ("Girl with a Pearl Earring", "Vermeer"), ("The Birth of Venus", "Botticelli"), ("Guernica", "Picasso"),
        ("The Persistence of Memory", "Dalí"), ("Water Lilies", "Monet"), ("American Gothic", "Wood"),
        ("The Kiss", "Klimt"), ("Las Meninas", "Velázquez"), ("The Garden of Earthly Delights", "Bosch"))),
    ("Who composed {x}?", (
        ("The Magic Flute", "Mozart"), ("The Nutcracker", "Tchaikovsky"), ("Swan Lake", "Tchaikovsky"),
        ("the oratorio Messiah", "Handel"), ("The Blue Danube", "Strauss"), ("the opera Carmen", "Bizet"),
        ("Boléro", "Ravel"), ("The Planets", "Holst"), ("Clair de Lune", "Debussy"),
        ("The Rite of Spring", "Stravinsky"), ("The Barber of Seville", "Rossini"), ("The Brandenburg Concertos", "Bach"))),
    ("Who invented {x}?", (
        ("the telephone", "Bell"), ("the light bulb", "Edison"), ("the printing press", "Gutenberg"),
        ("the World Wide Web", "Berners-Lee"), ("the radio", "Marconi"), ("the airplane", "Wright"),
        ("the mechanical television", "Baird"), ("the steam locomotive", "Stephenson"))),
    ("What is the chemical symbol for {x}?", (
        ("iron", "Fe"), ("silver", "Ag"), ("oxygen", "O"), ("sodium", "Na"), ("potassium", "K"), ("carbon", "C"),
        ("helium", "He"), ("copper", "Cu"), ("lead", "Pb"), ("tin", "Sn"), ("hydrogen", "H"), ("calcium", "Ca"),
        ("zinc", "Zn"), ("uranium", "U"))),
    ("In which country is {x}?", (
        ("Machu Picchu", "Peru"), ("the Taj Mahal", "India"), ("the Great Wall", "China"), ("Stonehenge", "England"),
        ("Angkor Wat", "Cambodia"), ("Petra", "Jordan"), ("the Leaning Tower of Pisa", "Italy"),
        ("Chichen Itza", "Mexico"), ("the Sagrada Familia", "Spain"), ("Table Mountain", "South Africa"),
        ("the Alhambra", "Spain"), ("Neuschwanstein Castle", "Germany"), ("the Brandenburg Gate", "Germany"),
        ("the Parthenon", "Greece"), ("the Blue Mosque", "Turkey"), ("Victoria Falls", "Zambia"))),
    ("How many {x}?", (
        ("seconds are in a minute", "60"), ("days are in a week", "seven"), ("months are in a year", "twelve"),
        ("centimetres are in a metre", "100"), ("grams are in a kilogram", "1,000"), ("years are in a century", "100"),
        ("years are in a decade", "ten"), ("sides does a square have", "four"), ("sides does an octagon have", "eight"),
        ("legs does an insect have", "six"), ("hearts does an octopus have", "three"), ("wheels does a bicycle have", "two"),
        ("planets are in the solar system", "eight"), ("colours are in a rainbow", "seven"),
        ("teeth does an adult human usually have", "32"), ("squares are on a chessboard", "64"))),
    ("What do you call a baby {x}?", (
        ("cat", "kitten"), ("dog", "puppy"), ("cow", "calf"), ("sheep", "lamb"), ("horse", "foal"), ("deer", "fawn"),
        ("frog", "tadpole"), ("swan", "cygnet"), ("bear", "cub"), ("duck", "duckling"), ("goose", "gosling"),
        ("pig", "piglet"))),
    ("What is the largest {x}?", (
        ("island in the world", "Greenland"), ("lake in Africa", "Victoria"), ("bird in the world", "ostrich"),
        ("fish in the sea", "whale shark"), ("rainforest in the world", "Amazon"))),
)
GENERAL_ANSWERS = {t.format(x=f): a for t, pairs in GENERAL_MORE for f, a in pairs}


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation whose last user turn needs no corpus; ``kind`` is one of ``CHAT_KINDS``."""

    kind: str
    messages: tuple[tuple[str, str], ...]  # (role, content), ending with a user turn

    def as_messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]


def _user(kind: str, text: str) -> ChatPrompt:
    return ChatPrompt(kind, (("user", text),))


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(2, 99), rng.randint(2, 40)
    return rng.choice((f"What is {a} plus {b}?", f"Calculate {a} minus {b}.", f"What is {a % 13 + 2} times {b % 12 + 2}?",
                       f"How much is {a * b} divided by {b}?", f"If I have {a} apples and give away {min(a, b)}, how many "
                       "are left?", f"What is {a}% of 200?", f"Add {a}, {b} and {a + b}.",
                       f"Is {a} an even or an odd number?", f"Which is larger, {a} or {b * 3}?"))


def _conversation(rng: random.Random) -> ChatPrompt:
    name, hobby = rng.choice(_NAMES), rng.choice(_HOBBIES)
    first = rng.choice((f"Hi, my name is {name} and I enjoy {hobby}.", f"I'm {name}. In my free time I like {hobby}.",
                        f"Hello! {name} here. My favourite hobby is {hobby}."))
    reply = f"Nice to meet you, {name}! {hobby[0].upper() + hobby[1:]} sounds like a lot of fun."
    second = rng.choice(("What is my name?", "What hobby did I mention?", "Can you remind me what I told you about myself?",
                         "Suggest a gift for someone who likes what I like.", "What did I say my name was?",
                         "Summarize what I just told you in one sentence."))
    return ChatPrompt("conversation", (("user", first), ("assistant", reply), ("user", second)))


def chat_prompts(n: int, seed: int = 0) -> list[ChatPrompt]:
    """``n`` distinct no-corpus prompts, the kinds in turn (seeded); a kind whose templates run out (greetings
    first, at 24) leaves its turns to the others, up to twice a kind's share; fewer than ``n`` when all are spent."""
    rng = random.Random(seed)
    makers = {
        "greeting": lambda: _user("greeting", rng.choice(_GREETINGS)),
        "arithmetic": lambda: _user("arithmetic", _arithmetic(rng)),
        "instruction": lambda: _user("instruction", rng.choice(("How do I {t}?", "Explain how to {t}.",
                                                                 "Give me steps to {t}.", "What's the best way to {t}?"))
                                     .format(t=rng.choice(_TASKS))),
        "rewrite": lambda: _user("rewrite", rng.choice((
            f"Fix the grammar in this sentence: {rng.choice(_SENTENCES)}",
            f"Rewrite this sentence in a more formal tone: {rng.choice(_SENTENCES)}",
            f"Shorten this sentence: {rng.choice(_SENTENCES)}",
            f"Translate \"{rng.choice(_WORDS)}\" into {rng.choice(_LANGUAGES)}.",
            f"How do you say \"{rng.choice(_WORDS)}\" in {rng.choice(_LANGUAGES)}?",
            f"Paraphrase: {rng.choice(_SENTENCES)}"))),
        "creative": lambda: _user("creative", "Write " + rng.choice(_FORMS).format(t=rng.choice(_TOPICS)) + "."),
        "advice": lambda: _user("advice", rng.choice(("{w}. Any advice?", "{w}. What should I do?",
                                                      "Can you give me some tips? {w}.")).format(
            w=(lambda s: s[0].upper() + s[1:])(rng.choice(_WORRIES)))),
        "conversation": lambda: _conversation(rng),
    }
    out: list[ChatPrompt] = []
    seen: set[tuple] = set()
    live = list(CHAT_KINDS)  # kinds that still make new prompts; one that misses 200 times in a row has run out
    cap = -(-2 * n // len(CHAT_KINDS))  # no kind takes more than twice its share of the turns others leave
    made = dict.fromkeys(CHAT_KINDS, 0)
    turn = 0
    while len(out) < n and live:
        kind = live[turn % len(live)]
        for _ in range(200):
            p = makers[kind]()
            if p.messages not in seen:
                seen.add(p.messages)
                out.append(p)
                made[kind] += 1
                turn += 1
                break
        else:
            made[kind] = cap
        if made[kind] >= cap:
            live.remove(kind)
    return out


def general_questions(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct general-knowledge questions (common facts no corpus document is about), seeded: the first 102
    from the first pool (the shipped default was trained on 100 of them, and a smaller ``n`` picks the same ones),
    then from ``GENERAL_MORE`` (``GENERAL_ANSWERS`` has their answers)."""
    rng = random.Random(seed)
    pool = [t.format(country=c) for t in _GENERAL for c in _COUNTRIES] + list(_GENERAL_FIXED)
    rng.shuffle(pool)
    more = list(GENERAL_ANSWERS)
    rng.shuffle(more)
    return (pool + more)[:n]
