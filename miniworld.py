"""miniworld.py: the embedded synthetic mini-world, an AppWorld data root generated from nothing.

Where this sits in ProST (progressive sub-task training): the method needs a world with multi-step tasks,
gold solutions split into sub-tasks (the teacher trajectories the roles are trained on) and an evaluator
(TGC / SGC). AppWorld's real data cannot be downloaded here and its licence forbids committing it, so this
file writes a complete data root in AppWorld's own layout (what `appworld download data` would produce)
from synthetic people and hand-written content: base databases for every app, API docs regenerated from the
installed package, task specs, per-task database change logs, ground truth (answer, test data, and an
evaluation.py that AppWorld's own evaluator runs) and, beside it, our gold solution as an ordered list of
sub-tasks {text, code}. world.py then serves these tasks exactly as it serves the real benchmark.

Each scenario is a small pure function of (rng, population, supervisor) returning the instruction, the gold
sub-tasks and declarative checks; one generic evaluation.py interprets the checks. The generated folder
(default `miniworld/`) is git-ignored; a rebuild from the same seed and secret is byte-identical. The secret
(random per build, kept in the data root) makes the held-out variants unknowable from this file and the seed.

CLI: `python miniworld.py build [--root DIR] [--seed N] [--secret S]` writes the world; `python miniworld.py check` runs
every gold solution through AppWorld's evaluator; `python miniworld.py show ID` prints a task's instruction
and gold sub-tasks. This module never imports torch, and imports appworld only inside the builder process.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import secrets
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from world import DEFAULT_ROOT, WorldPool, WorldSession, load_split, run_codes, task_dir, task_metadata

DB_VERSION = "0.1.0"  # AppWorld refuses tasks whose specs carry another db_version
NOW = datetime(2023, 6, 15, 10, 30, 0)  # "today" in every mini-world task
SEED_TIME = datetime(2023, 6, 1, 8, 0, 0)  # base content is created at this (frozen) moment
APPS = ("spotify", "venmo", "simple_note", "todoist", "phone")
GOLD_FILE = "subtasks.json"  # our own file beside AppWorld's ground truth
MARKER_FILE = "prost_miniworld.json"  # in <root>/data: says the folder is ours to replace on rebuild


# ======================================================================================================
# Content: hand-written lists the population is drawn from (no random-string junk).
# ======================================================================================================

PEOPLE = [  # (first name, last name, sex, birthday); first names are unique (admin.MainUser requires it)
    ("Maya", "Patel", "female", "1991-03-14"), ("Ethan", "Brooks", "male", "1988-07-02"),
    ("Priya", "Nair", "female", "1994-11-23"), ("Lucas", "Ferreira", "male", "1990-01-30"),
    ("Sofia", "Rossi", "female", "1996-06-08"), ("Daniel", "Kim", "male", "1985-09-17"),
    ("Aisha", "Rahman", "female", "1992-04-05"), ("Marcus", "Bennett", "male", "1987-12-11"),
    ("Hannah", "Fischer", "female", "1993-08-26"), ("Omar", "Haddad", "male", "1989-02-19"),
    ("Grace", "Okafor", "female", "1995-10-03"), ("Noah", "Sullivan", "male", "1992-05-21"),
    ("Chloe", "Dubois", "female", "1990-06-29"), ("Mateo", "Alvarez", "male", "1997-03-07"),
    ("Zara", "Hussain", "female", "1998-01-15"), ("Liam", "Walsh", "male", "1986-08-09"),
    ("Nadia", "Petrova", "female", "1991-06-12"), ("Owen", "Chen", "male", "1994-02-27"),
    ("Elena", "Moreno", "female", "1989-11-04"), ("Samuel", "Adeyemi", "male", "1993-06-22"),
    ("Ruby", "Lindqvist", "female", "1996-09-30"), ("Jonah", "Carter", "male", "1991-01-08"),
    ("Leila", "Saleh", "female", "1988-04-18"), ("Caleb", "Whitaker", "male", "1995-07-14"),
    ("Ines", "Duarte", "female", "1992-12-01"), ("Felix", "Novak", "male", "1990-03-25"),
    ("Tessa", "Hayes", "female", "1997-06-19"), ("Isaac", "Goldberg", "male", "1987-10-10"),
    ("Mira", "Iyer", "female", "1993-02-08"), ("Declan", "Murphy", "male", "1994-06-03"),
]
NUM_SUPERVISORS = 10  # the first people are the ones tasks are assigned to; the rest are their contacts
AREA_CODES = ("212", "310", "415", "503", "617", "646", "702", "720", "206", "512")
RELATIONSHIPS = ("friend", "coworker", "sibling", "cousin", "roommate", "neighbor", "manager")

ARTISTS = [  # (name, genre)
    ("Harbor Lights", "indie"), ("Velvet Meridian", "r&b"), ("Copper Fox", "rock"),
    ("Luna Vega", "pop"), ("The Midnight Orchard", "indie"), ("Static Bloom", "electronic"),
    ("Marisol Reyes", "latin"), ("Northbound Choir", "folk"), ("DJ Kairo", "electronic"),
    ("Ada Winslow", "jazz"), ("Blue Canyon Trio", "jazz"), ("Rhea Sol", "pop"),
    ("Iron Lantern", "rock"), ("Saffron Skies", "folk"), ("Kofi Mensah", "hip hop"),
    ("Neon Tide", "electronic"),
]
TITLE_WORDS_A = ("Midnight", "Golden", "Paper", "Silver", "Quiet", "Electric", "Wild", "Summer",
                 "Neon", "Hollow", "Velvet", "Broken", "Distant", "Crimson", "Sunday", "Little",
                 "Endless", "Burning", "Frozen", "Secret", "Borrowed", "Lonely", "Open", "Northern")
TITLE_WORDS_B = ("Hearts", "Rivers", "Lights", "Streets", "Dreams", "Roads", "Skies", "Waves",
                 "Letters", "Gardens", "Echoes", "Windows", "Shadows", "Horizons", "Fires", "Bridges",
                 "Stars", "Tides", "Mornings", "Promises", "Harbors", "Postcards", "Satellites", "Voices")
ALBUM_PATTERNS = ("Songs from the {b}", "{a} Season", "The {a} Sessions", "{a} {b}", "After the {b}")
PLAYLIST_TITLES = ("Road Trip", "Sunday Morning", "Workout Mix", "Focus Flow", "Late Night Drive",
                   "Dinner Party", "Rainy Day", "Summer Vibes", "Throwbacks", "Chill Evenings",
                   "Morning Run", "Study Session")

PAYMENT_NOTES = ("Dinner at Lucia's", "Concert tickets", "June rent share", "Groceries",
                 "Uber to the airport", "Birthday gift pool", "Brunch", "Movie night snacks",
                 "Electricity bill", "Pizza night", "Coffee beans", "Climbing gym pass",
                 "Farmers market", "Taxi home", "Book club wine", "Parking")
REQUEST_NOTES = ("Half of the cabin deposit", "Your share of the internet bill", "Tickets for Saturday",
                 "Team lunch", "Pottery class", "Wedding gift", "Gas for the road trip",
                 "Board game cafe")

NOTE_TEMPLATES = {  # title -> (tags, lines); lines are sampled so each person's note differs
    "Grocery List": (["shopping"], ["eggs", "oat milk", "spinach", "sourdough bread", "bananas",
                                    "greek yogurt", "cherry tomatoes", "chickpeas", "olive oil",
                                    "basmati rice", "cheddar", "coffee filters", "lemons", "garlic"]),
    "Books to Read": (["reading"], ["The Overstory", "Piranesi", "Educated", "The Remains of the Day",
                                    "Project Hail Mary", "Circe", "Atomic Habits", "The Dutch House",
                                    "Sapiens", "A Gentleman in Moscow", "Klara and the Sun"]),
    "Movie Watchlist": (["movies"], ["Past Lives", "Arrival", "Paddington 2", "The Grand Budapest Hotel",
                                     "Spirited Away", "Knives Out", "Amelie", "Moonlight", "Coco",
                                     "Before Sunrise", "Whiplash"]),
    "Packing List": (["travel"], ["passport", "phone charger", "sunscreen", "rain jacket",
                                  "hiking boots", "toothbrush", "reading glasses", "swimsuit",
                                  "travel adapter", "headphones", "first aid kit"]),
    "Gift Ideas": (["ideas", "personal"], ["scented candle", "cookbook", "wireless earbuds",
                                           "board game", "plant in a ceramic pot", "concert tickets",
                                           "leather notebook", "cozy socks", "espresso cups"]),
    "Weekend Chores": (["home"], ["water the plants", "vacuum the living room", "laundry",
                                  "clean the fridge", "take out recycling", "change bed sheets",
                                  "fix the squeaky door", "sort the mail"]),
    "Workout Plan": (["fitness"], ["5k easy run", "push-ups 3x15", "yoga flow 30 min", "squats 4x12",
                                   "plank 3x1 min", "cycling 45 min", "rest day", "swim 20 laps"]),
    "Recipe: Lentil Soup": (["cooking"], ["1 cup red lentils", "1 onion", "2 carrots", "3 garlic cloves",
                                          "1 tsp cumin", "4 cups vegetable stock", "juice of 1 lemon",
                                          "1 can diced tomatoes"]),
}

TODO_PROJECTS = {  # project -> task titles
    "Home Renovation": ["Get quotes for kitchen cabinets", "Pick paint colors for the hallway",
                        "Replace bathroom faucet", "Call the electrician", "Order new light fixtures",
                        "Patch the bedroom wall", "Measure windows for blinds", "Buy floor tiles"],
    "Work": ["Prepare quarterly report", "Review pull requests", "Update project roadmap",
             "Schedule 1:1 with manager", "Write onboarding guide", "Book conference travel",
             "Clean up shared drive", "Draft budget proposal"],
    "Vacation Planning": ["Book flights to Lisbon", "Reserve hotel", "Renew passport",
                          "Buy travel insurance", "Plan day trip to Sintra", "Exchange currency",
                          "Ask neighbor to feed the cat", "Download offline maps"],
    "Fitness Goals": ["Sign up for the 10k race", "Buy new running shoes", "Meal prep for the week",
                      "Book a physio appointment", "Try the spin class", "Log weekly mileage",
                      "Stretch after every run"],
    "Garden": ["Plant tomato seedlings", "Buy compost", "Fix the garden hose", "Prune the roses",
               "Build a raised bed", "Sow basil and parsley", "Trim the hedge"],
    "Moving Apartments": ["Book the moving van", "Pack the bookshelf", "Change mailing address",
                          "Cancel old internet plan", "Label all boxes", "Return keys to landlord",
                          "Deep clean the oven"],
}

TEXT_LINES = (
    "Are we still on for dinner on Friday?", "Running 10 minutes late, sorry!",
    "Can you send me the photos from the hike?", "Happy to help with the move on Saturday.",
    "Did you see the game last night?", "Thanks again for the book recommendation!",
    "Don't forget we have the meeting at 3.", "I found a great taco place near your office.",
    "Let me know when you land.", "Call me when you get a chance.",
)
ALARM_LABELS = ("Wake up", "Gym", "Take medication", "Team standup", "Pick up kids", "Water plants")


# ======================================================================================================
# Population: plain Python records with the ids the rows will get, drawn once from the build seed.
# Scenario functions read this structure to phrase tasks and compute expected answers.
# ======================================================================================================


@dataclass
class Person:
    id: int  # id in admin.MainUser and in every app's User table (inserted in the same order)
    first_name: str
    last_name: str
    sex: str
    birthday: str
    email: str
    phone_number: str
    passwords: dict[str, str]  # app -> password

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"


@dataclass
class Song:
    id: int
    title: str
    artist_id: int
    album_id: int
    duration: int  # seconds
    release_date: date
    genre: str
    play_count: int


@dataclass
class Playlist:
    id: int
    owner_id: int
    title: str
    is_public: bool
    song_ids: list[int]
    row_ids: list[int] = field(default_factory=list)  # spotify.PlaylistSong ids, aligned with song_ids


@dataclass
class Transaction:
    id: int
    sender_id: int
    receiver_id: int
    amount: float
    description: str
    created_at: datetime


@dataclass
class PaymentRequest:
    id: int
    sender_id: int  # the person asking for money
    receiver_id: int  # the person asked to pay
    amount: float
    description: str
    created_at: datetime
    status: str  # "pending", "approved" or "denied"


@dataclass
class Note:
    id: int
    owner_id: int
    title: str
    tags: list[str]
    lines: list[str]
    pinned: bool

    @property
    def content(self) -> str:
        return "\n".join(f"- {line}" for line in self.lines)


@dataclass
class Project:
    id: int
    owner_id: int
    name: str
    is_inbox: bool


@dataclass
class TodoTask:
    id: int
    project_id: int
    owner_id: int
    title: str
    due_date: date | None
    priority: str
    is_completed: bool
    order_index: int


@dataclass
class Contact:
    id: int
    owner_id: int
    person_id: int
    relationship: str


@dataclass
class Text:
    id: int  # GlobalTextMessage id
    sender_id: int
    receiver_id: int
    message: str
    created_at: datetime


@dataclass
class Alarm:
    id: int
    owner_id: int
    time: str
    repeat_days: list[str]
    label: str
    enabled: bool


@dataclass
class Population:
    people: list[Person]
    artists: list[tuple[str, str]]
    albums: list[tuple[str, int, str, date]]  # (title, artist id, genre, release date), id = index + 1
    songs: list[Song]
    playlists: list[Playlist]
    library: dict[int, list[int]]  # person id -> song ids in their Spotify library
    liked: dict[int, list[int]]  # person id -> liked song ids
    following: dict[int, list[int]]  # person id -> followed artist ids
    balances: dict[int, float]
    venmo_friends: dict[int, list[int]]
    transactions: list[Transaction]
    requests: list[PaymentRequest]
    notes: list[Note]
    projects: list[Project]
    tasks: list[TodoTask]
    contacts: list[Contact]
    texts: list[Text]
    alarms: list[Alarm]

    @property
    def supervisors(self) -> list[Person]:
        return self.people[:NUM_SUPERVISORS]

    def person(self, person_id: int) -> Person:
        return self.people[person_id - 1]

    def song(self, song_id: int) -> Song:
        return self.songs[song_id - 1]

    def playlists_of(self, person: Person) -> list[Playlist]:
        return [p for p in self.playlists if p.owner_id == person.id]

    def notes_of(self, person: Person) -> list[Note]:
        return [n for n in self.notes if n.owner_id == person.id]

    def projects_of(self, person: Person) -> list[Project]:
        return [p for p in self.projects if p.owner_id == person.id and not p.is_inbox]

    def tasks_in(self, project: Project) -> list[TodoTask]:
        return [t for t in self.tasks if t.project_id == project.id]

    def contacts_of(self, person: Person) -> list[Contact]:
        return [c for c in self.contacts if c.owner_id == person.id]

    def alarms_of(self, person: Person) -> list[Alarm]:
        return [a for a in self.alarms if a.owner_id == person.id]

    def transactions_of(self, person: Person) -> list[Transaction]:
        return [t for t in self.transactions if person.id in (t.sender_id, t.receiver_id)]

    def requests_of(self, person: Person) -> list[PaymentRequest]:
        return [r for r in self.requests if person.id in (r.sender_id, r.receiver_id)]

    def texts_of(self, person: Person) -> list[Text]:
        return [t for t in self.texts if person.id in (t.sender_id, t.receiver_id)]


def _password(rng: random.Random) -> str:
    words = ("maple", "river", "falcon", "copper", "lantern", "meadow", "harbor", "cobalt", "willow")
    return f"{rng.choice(words)}{rng.choice('!#$%&*')}{rng.randint(100, 9999)}{rng.choice('QXZKJW')}"


def _people(rng: random.Random) -> list[Person]:
    people, phones = [], set()
    for index, (first, last, sex, birthday) in enumerate(PEOPLE, start=1):
        phone = f"{rng.choice(AREA_CODES)}{rng.randint(200, 999)}{rng.randint(1000, 9999)}"
        while phone in phones:
            phone = f"{rng.choice(AREA_CODES)}{rng.randint(200, 999)}{rng.randint(1000, 9999)}"
        phones.add(phone)
        email = f"{first.lower()}.{last.lower()}@gmail.com"
        people.append(Person(index, first, last, sex, birthday, email, phone,
                             {app: _password(rng) for app in APPS}))
    return people


def _catalog(rng: random.Random) -> tuple[list, list[Song]]:
    titles = [f"{a} {b}" for a in TITLE_WORDS_A for b in TITLE_WORDS_B]
    rng.shuffle(titles)
    durations = rng.sample(range(140, 331), len(ARTISTS) * 2 * 5)  # unique: "longest song" has one answer
    albums, songs, used_album_titles = [], [], set()
    for artist_id, (_, genre) in enumerate(ARTISTS, start=1):
        for _ in range(2):
            album_title = rng.choice(ALBUM_PATTERNS).format(a=rng.choice(TITLE_WORDS_A),
                                                           b=rng.choice(TITLE_WORDS_B))
            while album_title in used_album_titles:
                album_title = rng.choice(ALBUM_PATTERNS).format(a=rng.choice(TITLE_WORDS_A),
                                                               b=rng.choice(TITLE_WORDS_B))
            used_album_titles.add(album_title)
            released = date(rng.randint(2014, 2022), rng.randint(1, 12), rng.randint(1, 28))
            albums.append((album_title, artist_id, genre, released))
            for _ in range(rng.randint(3, 5)):
                songs.append(Song(len(songs) + 1, titles.pop(), artist_id, len(albums), durations.pop(),
                                  released, genre, rng.randint(1_000, 900_000)))
    return albums, songs


def _spotify_content(rng, people, songs, pop_args) -> None:
    playlists, library, liked, following = [], {}, {}, {}
    for person in people[:NUM_SUPERVISORS]:
        for title in rng.sample(PLAYLIST_TITLES, 4):
            song_ids = sorted(rng.sample(range(1, len(songs) + 1), rng.randint(5, 11)))
            playlists.append(Playlist(len(playlists) + 1, person.id, title, rng.random() < 0.4, song_ids))
        library[person.id] = sorted(rng.sample(range(1, len(songs) + 1), rng.randint(12, 26)))
        liked[person.id] = sorted(rng.sample(range(1, len(songs) + 1), rng.randint(9, 24)))
        following[person.id] = sorted(rng.sample(range(1, len(ARTISTS) + 1), rng.randint(3, 6)))
    next_row = 1
    for playlist in playlists:  # PlaylistSong rows are inserted playlist by playlist, in song order
        playlist.row_ids = list(range(next_row, next_row + len(playlist.song_ids)))
        next_row += len(playlist.song_ids)
    pop_args.update(playlists=playlists, library=library, liked=liked, following=following)


def _venmo_content(rng, people, pop_args) -> None:
    friends: dict[int, set[int]] = {p.id: set() for p in people}
    for person in people[:NUM_SUPERVISORS]:
        for other in rng.sample([p.id for p in people if p.id != person.id], 9):
            friends[person.id].add(other)
            friends[other].add(person.id)
    transactions, requests = [], []
    for person in people[:NUM_SUPERVISORS]:
        for _ in range(rng.randint(10, 16)):
            other = rng.choice(sorted(friends[person.id]))
            sender, receiver = (person.id, other) if rng.random() < 0.6 else (other, person.id)
            when = datetime(2023, rng.randint(1, 6), rng.randint(1, 14), rng.randint(8, 21), rng.choice((0, 15, 30, 45)))
            amount = round(rng.choice((8, 12, 15, 18, 20, 24, 30, 35, 42, 50, 65, 80, 120)) + rng.choice((0, 0, 0.5, 0.25)), 2)
            transactions.append(Transaction(len(transactions) + 1, sender, receiver, amount,
                                            rng.choice(PAYMENT_NOTES), when))
        amounts = rng.sample((12, 18, 25, 30, 40, 55, 75), 5)  # distinct, so thresholds split them
        for index in range(rng.randint(3, 5)):
            other = rng.choice(sorted(friends[person.id]))
            asked_by_person = index % 2 == 1
            sender, receiver = (person.id, other) if asked_by_person else (other, person.id)
            status = "pending" if index < 3 or rng.random() < 0.5 else rng.choice(("approved", "denied"))
            when = datetime(2023, rng.randint(4, 6), rng.randint(1, 14), rng.randint(8, 21), 0)
            requests.append(PaymentRequest(len(requests) + 1, sender, receiver, float(amounts[index]),
                                           rng.choice(REQUEST_NOTES), when, status))
    balances = {p.id: float(rng.randint(60, 400)) for p in people}
    for person in people[:NUM_SUPERVISORS]:
        balances[person.id] = float(rng.randint(900, 2500))
    pop_args.update(balances=balances, transactions=transactions, requests=requests,
                    venmo_friends={k: sorted(v) for k, v in friends.items()})


def _note_content(rng, people, pop_args) -> None:
    notes = []
    for person in people[:NUM_SUPERVISORS]:
        for title in sorted(rng.sample(sorted(NOTE_TEMPLATES), 6)):
            tags, lines = NOTE_TEMPLATES[title]
            chosen = rng.sample(lines, rng.randint(4, min(9, len(lines))))
            notes.append(Note(len(notes) + 1, person.id, title, list(tags), chosen, rng.random() < 0.25))
    pop_args["notes"] = notes


def _todo_content(rng, people, pop_args) -> None:
    projects, tasks = [], []
    for person in people:  # every todoist user needs an Inbox project
        projects.append(Project(len(projects) + 1, person.id, "Inbox", True))
    for person in people[:NUM_SUPERVISORS]:
        for name in sorted(rng.sample(sorted(TODO_PROJECTS), 3)):
            project = Project(len(projects) + 1, person.id, name, False)
            projects.append(project)
            for order, title in enumerate(rng.sample(TODO_PROJECTS[name], rng.randint(5, 7))):
                due = NOW.date() + timedelta(days=rng.randint(-12, 20))
                done = due < NOW.date() and rng.random() < 0.4
                tasks.append(TodoTask(len(tasks) + 1, project.id, person.id, title, due,
                                      rng.choice(("high", "medium", "low")), done, order))
        own = [t for t in tasks if t.owner_id == person.id]
        if not any(t.is_completed for t in own):  # everyone has finished something
            earliest = min(own, key=lambda t: t.due_date)
            earliest.is_completed, earliest.due_date = True, min(earliest.due_date, NOW.date() - timedelta(days=1))
    pop_args.update(projects=projects, tasks=tasks)


def _phone_content(rng, people, pop_args) -> None:
    contacts, texts, alarms = [], [], []
    for person in people[:NUM_SUPERVISORS]:
        others = rng.sample([p.id for p in people if p.id != person.id], 12)
        for other in others:
            contacts.append(Contact(len(contacts) + 1, person.id, other, rng.choice(RELATIONSHIPS)))
        for other in rng.sample(others, 5):
            for _ in range(rng.randint(1, 4)):
                sender, receiver = (person.id, other) if rng.random() < 0.5 else (other, person.id)
                when = datetime(2023, rng.randint(5, 6), rng.randint(1, 14), rng.randint(7, 22), rng.randint(0, 59))
                texts.append(Text(0, sender, receiver, rng.choice(TEXT_LINES), when))
        for label in rng.sample(ALARM_LABELS, rng.randint(2, 4)):
            days = rng.choice((["monday", "tuesday", "wednesday", "thursday", "friday"], ["saturday", "sunday"], []))
            alarms.append(Alarm(len(alarms) + 1, person.id, f"{rng.randint(5, 21):02d}:{rng.choice((0, 15, 30, 45)):02d}",
                                days, label, rng.random() < 0.75))
    texts.sort(key=lambda t: t.created_at)  # inserted in time order, like a real phone would have
    for index, text in enumerate(texts, start=1):
        text.id = index
    pop_args.update(contacts=contacts, texts=texts, alarms=alarms)


def make_population(seed: int) -> Population:
    """Draw every person and every piece of app content from the build seed (pure Python, no appworld)."""
    rng = random.Random(f"prost-population-{seed}")
    people = _people(rng)
    albums, songs = _catalog(rng)
    args: dict[str, Any] = {}
    _spotify_content(rng, people, songs, args)
    _venmo_content(rng, people, args)
    _note_content(rng, people, args)
    _todo_content(rng, people, args)
    _phone_content(rng, people, args)
    return Population(people=people, artists=list(ARTISTS), albums=albums, songs=songs, **args)


# ======================================================================================================
# Writing the population into AppWorld's databases (runs inside the builder process, appworld imported).
# Rows are inserted in the population's id order; `_insert_many` checks they got the planned ids.
# ======================================================================================================


def _insert_many(model: Any, rows: list[dict]) -> None:
    """Insert rows into an empty table in one transaction; checks they got the ids 1, 2, ... the population
    assumed. Post-change hooks are skipped: they only refresh counters (set directly here)."""
    records = [model.create(**fields) for fields in rows]
    model.save_all(records, skip_post_change=True)
    if [record.id for record in records] != list(range(1, len(rows) + 1)):
        raise RuntimeError(f"{model.__name__} rows did not get the ids 1..{len(rows)}: was the table empty?")


def _insert_people(models: Any, pop: Population) -> None:
    people = pop.people
    _insert_many(models.admin.MainUser, [dict(first_name=p.first_name, last_name=p.last_name, email=p.email,
                                              phone_number=p.phone_number, birthday=p.birthday, sex=p.sex)
                                         for p in people])
    _insert_many(models.admin.AccountPassword, [dict(main_user_id=p.id, account_name=app, password=p.passwords[app])
                                                for p in people for app in APPS])
    for app in ("spotify", "simple_note", "todoist"):
        _insert_many(models[app].User, [dict(first_name=p.first_name, last_name=p.last_name, email=p.email,
                                             password=p.passwords[app], verified=True) for p in people])
    _insert_many(models.venmo.User, [dict(first_name=p.first_name, last_name=p.last_name, email=p.email,
                                          password=p.passwords["venmo"], verified=True,
                                          venmo_balance=pop.balances[p.id]) for p in people])
    _insert_many(models.phone.User, [dict(first_name=p.first_name, last_name=p.last_name, phone_number=p.phone_number,
                                          password=p.passwords["phone"]) for p in people])


def _as_datetime(day: date) -> datetime:
    return datetime(day.year, day.month, day.day)


def _insert_spotify(models: Any, pop: Population) -> None:
    s = models.spotify
    likes = Counter(song_id for song_ids in pop.liked.values() for song_id in song_ids)
    _insert_many(s.Artist, [dict(name=name, genre=genre) for name, genre in pop.artists])
    _insert_many(s.Album, [dict(title=title, artist_ids=[artist_id], genre=genre, release_date=_as_datetime(released))
                           for title, artist_id, genre, released in pop.albums])
    _insert_many(s.Song, [dict(title=song.title, artist_ids=[song.artist_id], album_id=song.album_id,
                               duration=song.duration, release_date=_as_datetime(song.release_date), genre=song.genre,
                               play_count=song.play_count, like_count=likes[song.id]) for song in pop.songs])
    _insert_many(s.Playlist, [dict(title=p.title, user_id=p.owner_id, is_public=p.is_public) for p in pop.playlists])
    _insert_many(s.PlaylistSong, [dict(playlist_id=p.id, song_id=song_id)
                                  for p in pop.playlists for song_id in p.song_ids])
    _insert_many(s.UserLibrarySong, [dict(user_id=person_id, song_id=song_id)
                                     for person_id, song_ids in pop.library.items() for song_id in song_ids])
    _insert_many(s.SongLike, [dict(user_id=person_id, song_id=song_id)
                              for person_id, song_ids in pop.liked.items() for song_id in song_ids])
    _insert_many(s.UserArtistFollowing, [dict(user_id=person_id, artist_id=artist_id)
                                         for person_id, artist_ids in pop.following.items() for artist_id in artist_ids])


def _insert_venmo(models: Any, pop: Population) -> None:
    v = models.venmo
    _insert_many(v.Friendship, [dict(user_id=person_id, friend_id=friend_id)
                                for person_id, friend_ids in pop.venmo_friends.items() for friend_id in friend_ids])
    _insert_many(v.Transaction, [dict(sender_id=t.sender_id, receiver_id=t.receiver_id, amount=t.amount,
                                      description=t.description, created_at=t.created_at, updated_at=t.created_at,
                                      private=False) for t in pop.transactions])
    _insert_many(v.PaymentRequest, [dict(sender_id=r.sender_id, receiver_id=r.receiver_id, amount=r.amount,
                                         description=r.description, created_at=r.created_at, updated_at=r.created_at,
                                         private=False,
                                         approved_at=r.created_at + timedelta(days=1) if r.status == "approved" else None,
                                         denied_at=r.created_at + timedelta(days=1) if r.status == "denied" else None)
                                    for r in pop.requests])


def _insert_notes_and_todos(models: Any, pop: Population) -> None:
    stamps = {note.id: SEED_TIME - timedelta(days=note.id % 40) for note in pop.notes}
    _insert_many(models.simple_note.Note, [dict(user_id=n.owner_id, title=n.title, content=n.content, tags=n.tags,
                                                pinned=n.pinned, created_at=stamps[n.id], updated_at=stamps[n.id])
                                           for n in pop.notes])
    t = models.todoist
    _insert_many(t.Project, [dict(user_id=p.owner_id, name=p.name, is_inbox=p.is_inbox,
                                  color="charcoal" if p.is_inbox else ("blue", "green", "orange", "red")[p.id % 4])
                             for p in pop.projects])
    _insert_many(t.ProjectCollaboratorLink, [dict(project_id=p.id, user_id=p.owner_id) for p in pop.projects])
    _insert_many(t.Task, [dict(project_id=task.project_id, user_id=task.owner_id, title=task.title,
                               due_date=_as_datetime(task.due_date) if task.due_date else None, priority=task.priority,
                               is_completed=task.is_completed, order_index=task.order_index) for task in pop.tasks])


def _insert_phone(models: Any, pop: Population) -> None:
    ph = models.phone
    contacts = [(c, pop.person(c.person_id)) for c in pop.contacts]
    _insert_many(ph.Contact, [dict(user_id=c.owner_id, first_name=o.first_name, last_name=o.last_name, email=o.email,
                                   phone_number=o.phone_number, relationships=[c.relationship], birthday=o.birthday)
                              for c, o in contacts])
    _insert_many(ph.GlobalTextMessage, [dict(sender_id=t.sender_id, receiver_id=t.receiver_id, message=t.message,
                                             created_at=t.created_at) for t in pop.texts])
    _insert_many(ph.UserTextMessage, [dict(global_text_message_id=t.id, user_id=user_id, created_at=t.created_at)
                                      for t in pop.texts for user_id in (t.sender_id, t.receiver_id)])
    _insert_many(ph.Alarm, [dict(user_id=a.owner_id, time=a.time, repeat_days=a.repeat_days, label=a.label,
                                 enabled=a.enabled, snooze_minutes=10, vibration=True) for a in pop.alarms])


def _insert_api_docs(models: Any, docs: dict[str, dict[str, dict]]) -> None:
    _insert_many(models.api_docs.ApiDoc, [dict(app_name_=app, api_name=name, path=doc["path"], method=doc["method"],
                                               description=doc["description"], parameters=doc["parameters"],
                                               response_schemas=doc["response_schemas"])
                                          for app, api_to_doc in docs.items() for name, doc in api_to_doc.items()])


def _write_api_docs(data_dir: Path) -> dict[str, dict[str, dict]]:
    """Regenerate AppWorld's standard API docs from the installed package (never committed)."""
    from appworld.api_docs import prepare_api_docs
    from appworld.apps import get_all_apps
    from appworld.common.constants import CANARY_STRING

    out_dir = data_dir / "api_docs" / "standard"
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = {}
    for app in get_all_apps(skip_admin=True):
        docs[app] = {doc["api_name"]: doc for doc in prepare_api_docs(app, include_private_apis=False)}
        _write_json(out_dir / f"{app}.json", {name: dict(doc, canary_string=CANARY_STRING)
                                               for name, doc in docs[app].items()})
    return docs


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ======================================================================================================
# Scenarios. A scenario is a task generator: given a seeded rng, the population and the supervisor the
# task is assigned to, it returns a `Gold`: the instruction, the gold solution as ordered sub-tasks
# {text, code} (code runs against `apis` in AppWorld's shell; later sub-tasks reuse earlier variables),
# the expected answer (None for state changes) and declarative checks read by the generic evaluation.py.
# ======================================================================================================

APP_TITLES = {"spotify": "Spotify", "venmo": "Venmo", "simple_note": "Simple Note", "todoist": "Todoist",
              "phone": "Phone"}


@dataclass
class Gold:
    """What a scenario returns for one task variant.

    checks: one dict per evaluation requirement (`requirement` is its text), by `kind`:
      answer        the answer given to complete_task equals `answer` (AppWorld's answer normalisation)
      no_answer     complete_task() was called without an answer (state-change tasks)
      added         the rows added to `model` are exactly `records` (each a dict of field values)
      updated       the rows of `model` that changed are exactly the ids in `records`, with those values
      removed       the rows removed from `model` are exactly `ids`
      only_changed  no model outside `allowed` changed (passes on a no-op)
    A field value may be a plain value or {"lines": [...]} (same non-empty lines, in order, bullets or
    numbering optional), {"contains": text}, {"date": "YYYY-MM-DD"} or {"set": bool} (is / is not None).
    """
    instruction: str
    subtasks: list[dict[str, str]]  # [{"text": natural-language sub-task, "code": Python against apis}]
    answer: Any = None  # None for state-change tasks
    checks: list[dict] = field(default_factory=list)


@dataclass
class Scenario:
    name: str  # task ids are f"{name}_{variant}", so the name has no underscore
    make: Callable[[random.Random, Population, Person], Gold]
    difficulty: int
    apps: tuple[str, ...]
    held_out: bool  # True: only in the test split (unseen scenario); False: train + dev variants


SCENARIOS: dict[str, Scenario] = {}
# A training scenario's variants 1-4 are in train and 5-6 in dev; a held-out scenario's 5 are all in test.
TRAIN_VARIANTS, DEV_VARIANTS, TEST_VARIANTS = 4, 2, 5


def scenario(name: str, difficulty: int, apps: tuple[str, ...], held_out: bool = False):
    """Register a task generator under `name`."""
    assert re.fullmatch(r"[a-z0-9]+", name), name

    def register(make):
        SCENARIOS[name] = Scenario(name, make, difficulty, apps, held_out)
        return make
    return register


def step(text: str, code: str) -> dict[str, str]:
    return {"text": text, "code": code.strip("\n")}


def login_step(app: str) -> dict[str, str]:
    """Sub-task: read the app password from the supervisor app and log in; leaves `<app>_token`."""
    username = 'profile["phone_number"]' if app == "phone" else 'profile["email"]'
    return step(
        f"Get my {APP_TITLES[app]} password from the supervisor app and log in to {APP_TITLES[app]}.",
        f"""
profile = apis.supervisor.show_profile()
passwords = {{item["account_name"]: item["password"] for item in apis.supervisor.show_account_passwords()}}
{app}_token = apis.{app}.login(username={username}, password=passwords["{app}"])["access_token"]
""")


def paged(var: str, call: str) -> str:
    """Code that collects every page of a paginated `apis` call into `var` (`call` has a {page} slot)."""
    return f"""
{var} = []
page_index = 0
while True:
    page = {call.format(page="page_index=page_index, page_limit=20")}
    {var}.extend(page)
    if len(page) < 20:
        break
    page_index += 1
"""


def finish_step(answer_expr: str | None = None, text: str | None = None) -> dict[str, str]:
    if answer_expr is None:
        return step(text or "Mark the task as complete.", "apis.supervisor.complete_task()")
    return step(text or "Report the answer and mark the task as complete.",
                f"apis.supervisor.complete_task(answer={answer_expr})")


def answer_check() -> dict:
    return {"kind": "answer", "requirement": "the answer given to complete_task matches the expected answer"}


def completed_check() -> dict:
    return {"kind": "no_answer",
            "requirement": "the task was marked complete with complete_task() and no answer"}


def only_changed_check(allowed: list[str]) -> dict:
    return {"kind": "only_changed", "allowed": sorted(allowed),
            "requirement": "no app data changed other than " + ", ".join(sorted(allowed))}


def money(amount: float) -> str:
    return f"${amount:,.2f}".replace(".00", "")


# ------------------------------------------------------------------------------------------------------
# Spotify scenarios
# ------------------------------------------------------------------------------------------------------

FIND_PLAYLIST = paged("playlists", "apis.spotify.show_playlist_library(access_token=spotify_token, {page})")


@scenario("playlistsize", difficulty=1, apps=("spotify",))
def playlist_size(rng, pop, sup):
    playlist = rng.choice(pop.playlists_of(sup))
    return Gold(
        f"How many songs are in my Spotify playlist titled '{playlist.title}'?",
        [login_step("spotify"),
         step(f"Find my playlist titled '{playlist.title}' in my Spotify playlist library.",
              FIND_PLAYLIST + f'playlist = next(p for p in playlists if p["title"] == "{playlist.title}")'),
         step("Count the songs in that playlist.",
              'num_songs = len(apis.spotify.show_playlist(playlist_id=playlist["playlist_id"], access_token=spotify_token)["songs"])'),
         finish_step("num_songs")],
        answer=len(playlist.song_ids),
        checks=[answer_check()])



@scenario("longestsong", difficulty=2, apps=("spotify",))
def longest_song(rng, pop, sup):
    playlist = rng.choice(pop.playlists_of(sup))
    longest = max((pop.song(i) for i in playlist.song_ids), key=lambda song: song.duration)
    return Gold(
        f"What is the title of the longest song in my Spotify playlist '{playlist.title}'?",
        [login_step("spotify"),
         step(f"Find my playlist titled '{playlist.title}' in my Spotify playlist library.",
              FIND_PLAYLIST + f'playlist = next(p for p in playlists if p["title"] == "{playlist.title}")\nprint(playlist)'),
         step("Look up the duration of every song in that playlist.",
              'songs = [apis.spotify.show_song(song_id=song_id) for song_id in playlist["song_ids"]]\n'
              'print([(song["title"], song["duration"]) for song in songs])'),
         step("Pick the song with the longest duration.",
              'longest_title = max(songs, key=lambda song: song["duration"])["title"]\nprint(longest_title)'),
         finish_step("longest_title")],
        answer=longest.title,
        checks=[answer_check()])


@scenario("likedartist", difficulty=2, apps=("spotify",))
def liked_by_artist(rng, pop, sup):
    liked = [pop.song(i) for i in pop.liked[sup.id]]
    artist_id = rng.choice(sorted({song.artist_id for song in liked}))
    artist = pop.artists[artist_id - 1][0]
    return Gold(
        f"How many of the songs I have liked on Spotify are by {artist}?",
        [login_step("spotify"),
         step("Collect all the songs I have liked on Spotify, page by page.",
              paged("liked_songs", "apis.spotify.show_liked_songs(access_token=spotify_token, {page})")
              + "print(len(liked_songs))"),
         step(f"Count the liked songs that have {artist} among their artists.",
              f'count = sum(any(artist["name"] == "{artist}" for artist in song["artists"]) for song in liked_songs)\nprint(count)'),
         finish_step("count")],
        answer=sum(song.artist_id == artist_id for song in liked),
        checks=[answer_check()])


@scenario("newplaylist", difficulty=2, apps=("spotify",))
def new_playlist_from_recent(rng, pop, sup):
    for playlist in rng.sample(pop.playlists_of(sup), len(pop.playlists_of(sup))):
        years = sorted({pop.song(i).release_date.year for i in playlist.song_ids})
        options = [y for y in years if 0 < sum(pop.song(i).release_date.year >= y for i in playlist.song_ids) < len(playlist.song_ids)]
        if options:
            break
    year = rng.choice(options)
    keep = [i for i in playlist.song_ids if pop.song(i).release_date.year >= year]
    taken = {p.title for p in pop.playlists_of(sup)}
    new_title = rng.choice([t for t in (f"Fresh {playlist.title}", f"{playlist.title} (New Releases)",
                                        f"Best of {playlist.title}") if t not in taken])
    return Gold(
        f"Create a private Spotify playlist called '{new_title}' with every song from my '{playlist.title}' "
        f"playlist that was released in {year} or later.",
        [login_step("spotify"),
         step(f"Find my playlist titled '{playlist.title}'.",
              FIND_PLAYLIST + f'source = next(p for p in playlists if p["title"] == "{playlist.title}")\nprint(source)'),
         step(f"Keep the songs of that playlist released in {year} or later.",
              f'recent_ids = [song_id for song_id in source["song_ids"]\n'
              f'              if int(apis.spotify.show_song(song_id=song_id)["release_date"][:4]) >= {year}]\n'
              'print(recent_ids)'),
         step(f"Create the private playlist '{new_title}'.",
              f'new_playlist_id = apis.spotify.create_playlist(title="{new_title}", is_public=False, '
              'access_token=spotify_token)["playlist_id"]'),
         step("Add the kept songs to the new playlist.",
              "for song_id in recent_ids:\n"
              "    apis.spotify.add_song_to_playlist(playlist_id=new_playlist_id, song_id=song_id, access_token=spotify_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "spotify.Playlist",
                 "records": [{"title": new_title, "user_id": sup.id, "is_public": False}],
                 "requirement": f"one private playlist titled '{new_title}' was created for the supervisor"},
                {"kind": "added", "model": "spotify.PlaylistSong", "records": [{"song_id": i} for i in keep],
                 "requirement": f"exactly the songs from '{playlist.title}' released in {year} or later were added to it"},
                only_changed_check(["spotify.Playlist", "spotify.PlaylistSong"]),
                completed_check()])


@scenario("savetolibrary", difficulty=2, apps=("spotify",))
def save_playlist_to_library(rng, pop, sup):
    library = set(pop.library[sup.id])
    candidates = [p for p in pop.playlists_of(sup) if set(p.song_ids) - library]
    playlist = rng.choice(candidates)
    missing = [i for i in playlist.song_ids if i not in library]
    return Gold(
        f"Make sure every song in my Spotify playlist '{playlist.title}' is saved in my Spotify song library.",
        [login_step("spotify"),
         step(f"Find my playlist titled '{playlist.title}'.",
              FIND_PLAYLIST + f'playlist = next(p for p in playlists if p["title"] == "{playlist.title}")\nprint(playlist)'),
         step("Collect the songs already in my song library, page by page.",
              paged("library", "apis.spotify.show_song_library(access_token=spotify_token, {page})")
              + 'library_ids = {song["song_id"] for song in library}\nprint(len(library_ids))'),
         step("Add the playlist's songs that are not in the library yet.",
              'for song_id in playlist["song_ids"]:\n'
              '    if song_id not in library_ids:\n'
              '        apis.spotify.add_song_to_library(song_id=song_id, access_token=spotify_token)'),
         finish_step()],
        checks=[{"kind": "added", "model": "spotify.UserLibrarySong",
                 "records": [{"song_id": i, "user_id": sup.id} for i in missing],
                 "requirement": f"the songs of '{playlist.title}' missing from the library were added to it, and nothing else"},
                only_changed_check(["spotify.UserLibrarySong"]),
                completed_check()])


@scenario("shortestliked", difficulty=2, apps=("spotify",), held_out=True)
def shortest_liked(rng, pop, sup):
    liked = sorted((pop.song(i) for i in pop.liked[sup.id]), key=lambda song: song.duration)
    return Gold(
        "What is the title of the shortest song I have liked on Spotify?",
        [login_step("spotify"),
         step("Collect all the songs I have liked on Spotify, page by page.",
              paged("liked_songs", "apis.spotify.show_liked_songs(access_token=spotify_token, {page})")
              + "print(len(liked_songs))"),
         step("Pick the liked song with the shortest duration.",
              'shortest_title = min(liked_songs, key=lambda song: song["duration"])["title"]\nprint(shortest_title)'),
         finish_step("shortest_title")],
        answer=liked[0].title,
        checks=[answer_check()])


@scenario("trimplaylist", difficulty=2, apps=("spotify",), held_out=True)
def trim_short_songs(rng, pop, sup):
    for playlist in rng.sample(pop.playlists_of(sup), len(pop.playlists_of(sup))):
        for minutes in rng.sample((3, 4), 2):
            short = [row for row, i in zip(playlist.row_ids, playlist.song_ids) if pop.song(i).duration < 60 * minutes]
            if 0 < len(short) < len(playlist.song_ids):
                break
        else:
            continue
        break
    return Gold(
        f"Remove every song shorter than {minutes} minutes from my Spotify playlist '{playlist.title}'.",
        [login_step("spotify"),
         step(f"Find my playlist titled '{playlist.title}'.",
              FIND_PLAYLIST + f'playlist = next(p for p in playlists if p["title"] == "{playlist.title}")\nprint(playlist)'),
         step(f"Find the songs in it that are shorter than {minutes} minutes ({60 * minutes} seconds).",
              f'short_ids = [song_id for song_id in playlist["song_ids"]\n'
              f'             if apis.spotify.show_song(song_id=song_id)["duration"] < {60 * minutes}]\nprint(short_ids)'),
         step("Remove those songs from the playlist.",
              "for song_id in short_ids:\n"
              '    apis.spotify.remove_song_from_playlist(playlist_id=playlist["playlist_id"], song_id=song_id, '
              "access_token=spotify_token)"),
         finish_step()],
        checks=[{"kind": "removed", "model": "spotify.PlaylistSong", "ids": short,
                 "requirement": f"exactly the songs shorter than {minutes} minutes were removed from '{playlist.title}'"},
                only_changed_check(["spotify.PlaylistSong"]),
                completed_check()])


@scenario("followartists", difficulty=2, apps=("spotify",), held_out=True)
def follow_playlist_artists(rng, pop, sup):
    following = set(pop.following[sup.id])
    candidates = [p for p in pop.playlists_of(sup) if {pop.song(i).artist_id for i in p.song_ids} - following]
    playlist = rng.choice(candidates)
    new = sorted({pop.song(i).artist_id for i in playlist.song_ids} - following)
    return Gold(
        f"Follow on Spotify every artist of the songs in my playlist '{playlist.title}' that I am not following yet.",
        [login_step("spotify"),
         step(f"Find my playlist '{playlist.title}' and collect the artists of its songs.",
              FIND_PLAYLIST + f'playlist = next(p for p in playlists if p["title"] == "{playlist.title}")\n'
              'songs = apis.spotify.show_playlist(playlist_id=playlist["playlist_id"], access_token=spotify_token)["songs"]\n'
              'artist_ids = sorted({artist_id for song in songs for artist_id in song["artist_ids"]})\nprint(artist_ids)'),
         step("Collect the artists I already follow, page by page.",
              paged("followed", "apis.spotify.show_following_artists(access_token=spotify_token, {page})")
              + 'followed_ids = {artist["artist_id"] for artist in followed}\nprint(sorted(followed_ids))'),
         step("Follow the playlist's artists I do not follow yet.",
              "for artist_id in artist_ids:\n"
              "    if artist_id not in followed_ids:\n"
              "        apis.spotify.follow_artist(artist_id=artist_id, access_token=spotify_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "spotify.UserArtistFollowing",
                 "records": [{"user_id": sup.id, "artist_id": a} for a in new],
                 "requirement": f"exactly the artists of '{playlist.title}' not followed before are now followed"},
                only_changed_check(["spotify.UserArtistFollowing"]),
                completed_check()])


# ------------------------------------------------------------------------------------------------------
# Venmo scenarios
# ------------------------------------------------------------------------------------------------------

FRIENDS = paged("friends", "apis.venmo.search_friends(access_token=venmo_token, {page})")


def friend_lookup(person: Person) -> dict[str, str]:
    return step(f"Find {person.name}'s email address among my Venmo friends.",
                FRIENDS + f'friend_email = next(f["email"] for f in friends\n'
                          f'                    if f["first_name"] == "{person.first_name}" and f["last_name"] == "{person.last_name}")\n'
                          "print(friend_email)")


@scenario("venmosent", difficulty=1, apps=("venmo",))
def total_sent_to_friend(rng, pop, sup):
    sent = [t for t in pop.transactions_of(sup) if t.sender_id == sup.id]
    friend = pop.person(rng.choice(sorted({t.receiver_id for t in sent})))
    total = round(sum(t.amount for t in sent if t.receiver_id == friend.id), 2)
    return Gold(
        f"How much money have I sent to {friend.name} on Venmo in total?",
        [login_step("venmo"),
         step(f"Collect all my Venmo transactions with {friend.name} ({friend.email}), page by page.",
              paged("transactions", f'apis.venmo.show_transactions(user_email="{friend.email}", '
                                    "access_token=venmo_token, {page})") + "print(len(transactions))"),
         step("Add up the amounts of the transactions I sent to them.",
              'total = round(sum(t["amount"] for t in transactions if t["sender"]["email"] == profile["email"]), 2)\n'
              "print(total)"),
         finish_step("total")],
        answer=total,
        checks=[answer_check()])


@scenario("payfriend", difficulty=1, apps=("venmo",))
def pay_friend(rng, pop, sup):
    friend = pop.person(rng.choice(pop.venmo_friends[sup.id]))
    amount = float(rng.choice((15, 20, 25, 32, 40, 48, 60, 75)))
    note = rng.choice(PAYMENT_NOTES)
    return Gold(
        f"Send {money(amount)} to my friend {friend.name} on Venmo with the note '{note}'.",
        [login_step("venmo"),
         friend_lookup(friend),
         step(f"Send {money(amount)} to {friend.first_name} with the note '{note}'.",
              f'apis.venmo.create_transaction(receiver_email=friend_email, amount={amount}, description="{note}", '
              "access_token=venmo_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "venmo.Transaction",
                 "records": [{"sender_id": sup.id, "receiver_id": friend.id, "amount": amount, "description": note}],
                 "requirement": f"one payment of {money(amount)} to {friend.name} with the note '{note}' was made"},
                only_changed_check(["venmo.Transaction", "venmo.User", "venmo.Notification"]),
                completed_check()])


@scenario("settlerequests", difficulty=2, apps=("venmo",))
def settle_requests(rng, pop, sup):
    pending = [r for r in pop.requests_of(sup) if r.receiver_id == sup.id and r.status == "pending"]
    amounts = sorted({r.amount for r in pending})
    threshold = rng.choice(amounts[1:])  # at least one request to approve and one to deny
    records = {str(r.id): {"approved_at": {"set": r.amount < threshold}, "denied_at": {"set": r.amount >= threshold}}
               for r in pending}
    approved = [r for r in pending if r.amount < threshold]
    return Gold(
        f"Approve every pending Venmo payment request I have received that is for less than {money(threshold)}, "
        "and deny all my other pending received requests.",
        [login_step("venmo"),
         step("Collect all pending payment requests I have received, page by page.",
              paged("requests", 'apis.venmo.show_received_payment_requests(status="pending", '
                                "access_token=venmo_token, {page})")
              + 'print([(r["payment_request_id"], r["amount"], r["sender"]["name"]) for r in requests])'),
         step(f"Approve the requests for less than {money(threshold)}.",
              "for request in requests:\n"
              f'    if request["amount"] < {threshold}:\n'
              '        apis.venmo.approve_payment_request(payment_request_id=request["payment_request_id"], '
              "access_token=venmo_token)"),
         step("Deny the remaining pending requests.",
              "for request in requests:\n"
              f'    if request["amount"] >= {threshold}:\n'
              '        apis.venmo.deny_payment_request(payment_request_id=request["payment_request_id"], '
              "access_token=venmo_token)"),
         finish_step()],
        checks=[{"kind": "updated", "model": "venmo.PaymentRequest", "records": records,
                 "requirement": f"pending received requests under {money(threshold)} were approved and the rest denied"},
                {"kind": "added", "model": "venmo.Transaction",
                 "records": [{"sender_id": sup.id, "receiver_id": r.sender_id, "amount": r.amount} for r in approved],
                 "requirement": "one payment was made for each approved request and no other payment"},
                only_changed_check(["venmo.PaymentRequest", "venmo.Transaction", "venmo.User", "venmo.Notification"]),
                completed_check()])


@scenario("monthreceived", difficulty=2, apps=("venmo",), held_out=True)
def received_in_month(rng, pop, sup):
    received = [t for t in pop.transactions_of(sup) if t.receiver_id == sup.id]
    month = rng.choice(sorted({t.created_at.month for t in received}))
    total = round(sum(t.amount for t in received if t.created_at.month == month), 2)
    name = date(2023, month, 1).strftime("%B")
    return Gold(
        f"How much money did I receive on Venmo in {name} 2023?",
        [login_step("venmo"),
         step(f"Collect my Venmo transactions from {name} 2023, page by page.",
              paged("transactions", f'apis.venmo.show_transactions(min_created_at="2023-{month:02d}-01", '
                                    f'max_created_at="2023-{month:02d}-{[31, 28, 31, 30, 31, 30][month - 1]}", '
                                    "access_token=venmo_token, {page})") + "print(len(transactions))"),
         step("Add up the amounts of the ones I received.",
              'total = round(sum(t["amount"] for t in transactions if t["receiver"]["email"] == profile["email"]), 2)\n'
              "print(total)"),
         finish_step("total")],
        answer=total,
        checks=[answer_check()])


@scenario("venmobalance", difficulty=1, apps=("venmo",))
def venmo_balance(rng, pop, sup):
    return Gold(
        rng.choice(("What is my current Venmo balance?", "How much money is in my Venmo account right now?")),
        [login_step("venmo"),
         finish_step('apis.venmo.show_venmo_balance(access_token=venmo_token)["venmo_balance"]',
                     "Read my Venmo balance, report it and mark the task as complete.")],
        answer=pop.balances[sup.id],
        checks=[answer_check()])


@scenario("pendingowed", difficulty=2, apps=("venmo",), held_out=True)
def pending_received_total(rng, pop, sup):
    pending = [r for r in pop.requests_of(sup) if r.receiver_id == sup.id and r.status == "pending"]
    return Gold(
        rng.choice(("How much money in total are people asking me for in Venmo payment requests I have not "
                    "answered yet?", "What is the total amount of the pending Venmo payment requests I have received?")),
        [login_step("venmo"),
         step("Collect the pending payment requests I have received, page by page.",
              paged("requests", 'apis.venmo.show_received_payment_requests(status="pending", '
                                "access_token=venmo_token, {page})")
              + 'print([(r["sender"]["name"], r["amount"]) for r in requests])'),
         step("Add up their amounts.", 'total = round(sum(r["amount"] for r in requests), 2)\nprint(total)'),
         finish_step("total")],
        answer=round(sum(r.amount for r in pending), 2),
        checks=[answer_check()])


# ------------------------------------------------------------------------------------------------------
# Simple Note scenarios
# ------------------------------------------------------------------------------------------------------

FIND_NOTES = paged("notes", "apis.simple_note.search_notes(access_token=simple_note_token, {page})")


def note_lookup(title: str) -> dict[str, str]:
    return step(f"Find my note titled '{title}' and read it.",
                FIND_NOTES + f'note_id = next(n["note_id"] for n in notes if n["title"] == "{title}")\n'
                             "note = apis.simple_note.show_note(note_id=note_id, access_token=simple_note_token)\n"
                             'print(note["content"])')


@scenario("notecount", difficulty=1, apps=("simple_note",))
def note_item_count(rng, pop, sup):
    note = rng.choice(pop.notes_of(sup))
    return Gold(
        f"How many items are on my '{note.title}' note in Simple Note?",
        [login_step("simple_note"),
         note_lookup(note.title),
         step("Count the non-empty lines of the note.",
              'num_items = len([line for line in note["content"].splitlines() if line.strip()])\nprint(num_items)'),
         finish_step("num_items")],
        answer=len(note.lines),
        checks=[answer_check()])


@scenario("appendnote", difficulty=1, apps=("simple_note",))
def append_to_note(rng, pop, sup):
    note = rng.choice([n for n in pop.notes_of(sup) if set(NOTE_TEMPLATES[n.title][1]) - set(n.lines)])
    item = rng.choice([line for line in NOTE_TEMPLATES[note.title][1] if line not in note.lines])
    return Gold(
        f"Add '{item}' to the end of my '{note.title}' note in Simple Note, in the same style as the other items.",
        [login_step("simple_note"),
         note_lookup(note.title),
         step(f"Append '- {item}' as a new last line of the note.",
              f'apis.simple_note.add_content_to_note(note_id=note_id, append_or_prepend="append", '
              f'added_content="\\n- {item}", access_token=simple_note_token)'),
         finish_step()],
        checks=[{"kind": "updated", "model": "simple_note.Note",
                 "records": {str(note.id): {"content": {"lines": note.lines + [item]}}},
                 "requirement": f"'{note.title}' now lists its old items plus '{item}', and no other note changed"},
                only_changed_check(["simple_note.Note"]),
                completed_check()])


@scenario("pintag", difficulty=2, apps=("simple_note",), held_out=True)
def pin_tagged_notes(rng, pop, sup):
    notes = pop.notes_of(sup)
    tag = rng.choice(sorted({tag for n in notes if not n.pinned for tag in n.tags}))
    to_pin = [n for n in notes if tag in n.tags and not n.pinned]
    return Gold(
        f"Pin every note in Simple Note that is tagged '{tag}'.",
        [login_step("simple_note"),
         step(f"Collect my notes tagged '{tag}', page by page.",
              paged("notes", f'apis.simple_note.search_notes(tags=["{tag}"], access_token=simple_note_token, {{page}})')
              + 'print([(n["title"], n["pinned"]) for n in notes])'),
         step("Pin the ones that are not pinned yet.",
              "for note in notes:\n"
              f'    if "{tag}" in note["tags"] and not note["pinned"]:\n'
              '        apis.simple_note.update_note(note_id=note["note_id"], pinned=True, access_token=simple_note_token)'),
         finish_step()],
        checks=[{"kind": "updated", "model": "simple_note.Note",
                 "records": {str(n.id): {"pinned": True} for n in to_pin},
                 "requirement": f"every note tagged '{tag}' is pinned and no other note changed"},
                only_changed_check(["simple_note.Note"]),
                completed_check()])


# ------------------------------------------------------------------------------------------------------
# Todoist scenarios
# ------------------------------------------------------------------------------------------------------

FIND_PROJECTS = paged("projects", "apis.todoist.show_projects(access_token=todoist_token, {page})")


def project_tasks_step(project: str) -> dict[str, str]:
    return step(f"Find my Todoist project '{project}' and list its tasks.",
                FIND_PROJECTS + f'project_id = next(p["project_id"] for p in projects if p["name"] == "{project}")\n'
                                "tasks = apis.todoist.show_tasks(project_id=project_id, access_token=todoist_token)"
                                '["no_section_tasks"]\n'
                                'print([(t["task_id"], t["title"], t["due_date"], t["is_completed"]) for t in tasks])')


def long_date(day: date) -> str:
    return f"{day.strftime('%B')} {day.day}, {day.year}"


@scenario("tododue", difficulty=2, apps=("todoist",))
def count_due_before(rng, pop, sup):
    project = rng.choice(pop.projects_of(sup))
    cutoff = NOW.date() + timedelta(days=rng.randint(-5, 12))
    count = sum(not t.is_completed and t.due_date < cutoff for t in pop.tasks_in(project))
    return Gold(
        f"How many unfinished tasks in my Todoist project '{project.name}' are due before {long_date(cutoff)}?",
        [login_step("todoist"),
         project_tasks_step(project.name),
         step(f"Count the unfinished tasks due before {cutoff.isoformat()}.",
              f'count = sum(not t["is_completed"] and t["due_date"] is not None and t["due_date"][:10] < "{cutoff.isoformat()}" '
              "for t in tasks)\nprint(count)"),
         finish_step("count")],
        answer=count,
        checks=[answer_check()])


@scenario("completetodo", difficulty=1, apps=("todoist",))
def complete_todo(rng, pop, sup):
    task = rng.choice([t for t in pop.tasks if t.owner_id == sup.id and not t.is_completed])
    project = next(p for p in pop.projects if p.id == task.project_id)
    return Gold(
        f"Mark the task '{task.title}' in my Todoist project '{project.name}' as done.",
        [login_step("todoist"),
         project_tasks_step(project.name),
         step(f"Mark '{task.title}' as completed.",
              f'task_id = next(t["task_id"] for t in tasks if t["title"] == "{task.title}")\n'
              "apis.todoist.update_task(task_id=task_id, is_completed=True, access_token=todoist_token)"),
         finish_step()],
        checks=[{"kind": "updated", "model": "todoist.Task", "records": {str(task.id): {"is_completed": True}},
                 "requirement": f"'{task.title}' is completed and no other task changed"},
                only_changed_check(["todoist.Task"]),
                completed_check()])


@scenario("reschedule", difficulty=3, apps=("todoist",), held_out=True)
def reschedule_overdue(rng, pop, sup):
    projects = [p for p in pop.projects_of(sup)
                if any(not t.is_completed and t.due_date < NOW.date() for t in pop.tasks_in(p))]
    project = rng.choice(projects)
    overdue = [t for t in pop.tasks_in(project) if not t.is_completed and t.due_date < NOW.date()]
    new_day = NOW.date() + timedelta(days=rng.randint(2, 9))
    return Gold(
        f"Every unfinished task in my Todoist project '{project.name}' that is overdue should now be due on "
        f"{long_date(new_day)} with high priority. Please update them.",
        [login_step("todoist"),
         project_tasks_step(project.name),
         step("Pick the unfinished tasks whose due date is before today.",
              'today = DateTime.now().strftime("%Y-%m-%d")\n'
              'overdue = [t for t in tasks if not t["is_completed"] and t["due_date"] and t["due_date"][:10] < today]\n'
              'print([t["title"] for t in overdue])'),
         step(f"Move them to {new_day.isoformat()} with high priority.",
              "for task in overdue:\n"
              f'    apis.todoist.update_task(task_id=task["task_id"], due_date="{new_day.isoformat()}", priority="high", '
              "access_token=todoist_token)"),
         finish_step()],
        checks=[{"kind": "updated", "model": "todoist.Task",
                 "records": {str(t.id): {"due_date": {"date": new_day.isoformat()}, "priority": "high"} for t in overdue},
                 "requirement": f"the overdue unfinished tasks of '{project.name}' are due {new_day.isoformat()} "
                                "with high priority, and no other task changed"},
                only_changed_check(["todoist.Task"]),
                completed_check()])


@scenario("cleardone", difficulty=2, apps=("todoist",), held_out=True)
def clear_completed(rng, pop, sup):
    project = rng.choice([p for p in pop.projects_of(sup) if any(t.is_completed for t in pop.tasks_in(p))])
    done = [t.id for t in pop.tasks_in(project) if t.is_completed]
    return Gold(
        f"Delete all the completed tasks from my Todoist project '{project.name}'.",
        [login_step("todoist"),
         project_tasks_step(project.name),
         step("Delete the tasks that are completed.",
              "for task in tasks:\n"
              '    if task["is_completed"]:\n'
              '        apis.todoist.delete_task(task_id=task["task_id"], access_token=todoist_token)'),
         finish_step()],
        checks=[{"kind": "removed", "model": "todoist.Task", "ids": done,
                 "requirement": f"exactly the completed tasks of '{project.name}' were deleted"},
                only_changed_check(["todoist.Task"]),
                completed_check()])


# ------------------------------------------------------------------------------------------------------
# Phone scenarios
# ------------------------------------------------------------------------------------------------------


def plural(word: str) -> str:
    return word + "s"


def contacts_step(relationship: str | None = None) -> dict[str, str]:
    if relationship is None:
        return step("Collect all my phone contacts, page by page.",
                    paged("contacts", "apis.phone.search_contacts(access_token=phone_token, {page})")
                    + "print(len(contacts))")
    return step(f"Collect my phone contacts who are my {plural(relationship)}, page by page.",
                paged("contacts", f'apis.phone.search_contacts(relationship="{relationship}", '
                                  "access_token=phone_token, {page})")
                + f'contacts = [c for c in contacts if "{relationship}" in c["relationships"]]\n'
                  'print([(c["first_name"], c["last_name"], c["email"]) for c in contacts])')


@scenario("contactphone", difficulty=1, apps=("phone",))
def contact_phone_number(rng, pop, sup):
    contact = rng.choice(pop.contacts_of(sup))
    other = pop.person(contact.person_id)
    return Gold(
        f"What is the phone number of my {contact.relationship} {other.name}?",
        [login_step("phone"),
         step(f"Search my contacts for {other.name} and read the phone number.",
              f'matches = apis.phone.search_contacts(query="{other.name}", access_token=phone_token)\n'
              f'number = next(c["phone_number"] for c in matches if c["first_name"] == "{other.first_name}" '
              f'and c["last_name"] == "{other.last_name}")\nprint(number)'),
         finish_step("number")],
        answer=other.phone_number,
        checks=[answer_check()])


@scenario("setalarm", difficulty=1, apps=("phone",))
def set_alarm(rng, pop, sup):
    taken = {(a.time, a.label) for a in pop.alarms_of(sup)}
    label = rng.choice([label for label in ALARM_LABELS + ("Yoga", "Call mom", "Leave for work")
                        if label not in {a.label for a in pop.alarms_of(sup)}])
    clock = f"{rng.randint(5, 21):02d}:{rng.choice((0, 10, 20, 30, 40, 50)):02d}"
    days_name, days = rng.choice((("every weekday", ["monday", "tuesday", "wednesday", "thursday", "friday"]),
                                  ("on weekends", ["saturday", "sunday"]),
                                  ("every Monday and Thursday", ["monday", "thursday"])))
    assert (clock, label) not in taken
    return Gold(
        f"Set an alarm on my phone for {clock} {days_name}, labelled '{label}'.",
        [login_step("phone"),
         step(f"Create the alarm at {clock} repeating {days_name} with the label '{label}'.",
              f'apis.phone.create_alarm(time="{clock}", repeat_days={days!r}, label="{label}", enabled=True, '
              "access_token=phone_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "phone.Alarm",
                 "records": [{"user_id": sup.id, "time": clock, "repeat_days": days, "label": label, "enabled": True}],
                 "requirement": f"one enabled alarm at {clock} repeating {days_name} labelled '{label}' was added"},
                only_changed_check(["phone.Alarm"]),
                completed_check()])


@scenario("textgroup", difficulty=2, apps=("phone",))
def text_relationship_group(rng, pop, sup):
    by_relation = Counter(c.relationship for c in pop.contacts_of(sup))
    relationship = rng.choice(sorted(r for r, n in by_relation.items() if n >= 2) or sorted(by_relation))
    receivers = [c.person_id for c in pop.contacts_of(sup) if c.relationship == relationship]
    message = rng.choice(("Game night at my place on Saturday at 7, bring snacks!",
                          "I'm organizing a picnic in the park this Sunday, can you come?",
                          "Quick reminder: the potluck is tomorrow at noon.",
                          "Thanks for all your help this month, coffee is on me next week!"))
    return Gold(
        f"Text all my {plural(relationship)} in my phone contacts: \"{message}\"",
        [login_step("phone"),
         contacts_step(relationship),
         step("Send each of them the message.",
              "for contact in contacts:\n"
              f'    apis.phone.send_text_message(phone_number=contact["phone_number"], message={message!r}, '
              "access_token=phone_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "phone.GlobalTextMessage",
                 "records": [{"sender_id": sup.id, "receiver_id": r, "message": message} for r in receivers],
                 "requirement": f"each {relationship} got the message once and nobody else was texted"},
                only_changed_check(["phone.GlobalTextMessage", "phone.UserTextMessage"]),
                completed_check()])


@scenario("textcount", difficulty=1, apps=("phone",), held_out=True)
def count_texts_from(rng, pop, sup):
    texts = pop.texts_of(sup)
    other = pop.person(rng.choice(sorted({t.sender_id for t in texts if t.sender_id != sup.id})))
    count = sum(t.sender_id == other.id and t.receiver_id == sup.id for t in texts)
    return Gold(
        f"How many text messages have I received from {other.name}?",
        [login_step("phone"),
         step(f"Collect my text conversation with {other.name} ({other.phone_number}), page by page.",
              paged("messages", f'apis.phone.search_text_messages(phone_number="{other.phone_number}", '
                                "access_token=phone_token, {page})") + "print(len(messages))"),
         step(f"Count the messages {other.first_name} sent to me.",
              f'count = sum(m["sender"]["phone_number"] == "{other.phone_number}" for m in messages)\nprint(count)'),
         finish_step("count")],
        answer=count,
        checks=[answer_check()])


# ------------------------------------------------------------------------------------------------------
# Multi-app scenarios
# ------------------------------------------------------------------------------------------------------


@scenario("tracklist", difficulty=2, apps=("spotify", "simple_note"))
def playlist_tracklist_note(rng, pop, sup):
    playlist = rng.choice(pop.playlists_of(sup))
    title = f"{playlist.title} Tracklist"
    titles = [pop.song(i).title for i in playlist.song_ids]
    return Gold(
        f"Create a note in Simple Note titled '{title}' that lists the titles of the songs in my Spotify "
        f"playlist '{playlist.title}', one per line.",
        [login_step("spotify"),
         step(f"Find my playlist titled '{playlist.title}'.",
              FIND_PLAYLIST + f'playlist = next(p for p in playlists if p["title"] == "{playlist.title}")'),
         step("Get the titles of its songs.",
              'song_titles = [s["title"] for s in apis.spotify.show_playlist(playlist_id=playlist["playlist_id"], '
              'access_token=spotify_token)["songs"]]\nprint(song_titles)'),
         login_step("simple_note"),
         step(f"Create the note '{title}' with one song title per line.",
              f'apis.simple_note.create_note(title="{title}", content="\\n".join(song_titles), '
              "access_token=simple_note_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "simple_note.Note",
                 "records": [{"user_id": sup.id, "title": title, "content": {"lines": titles}}],
                 "requirement": f"a note '{title}' listing exactly the playlist's song titles was created"},
                only_changed_check(["simple_note.Note"]),
                completed_check()])


@scenario("splitbill", difficulty=3, apps=("phone", "venmo"))
def split_bill(rng, pop, sup):
    by_relation = Counter(c.relationship for c in pop.contacts_of(sup))
    relationship = rng.choice(sorted(r for r, n in by_relation.items() if 2 <= n <= 4) or sorted(by_relation))
    people = [c.person_id for c in pop.contacts_of(sup) if c.relationship == relationship]
    share = float(rng.choice((12, 15, 18, 22, 25, 30, 36)))
    total = share * (len(people) + 1)
    occasion = rng.choice(("Dinner at Lucia's", "Cabin weekend", "Concert tickets", "Escape room", "Bowling night"))
    return Gold(
        f"I paid {money(total)} for '{occasion}', shared equally between me and all my {plural(relationship)} "
        f"from my phone contacts. Request each of them their share on Venmo with the note '{occasion}'.",
        [login_step("phone"),
         contacts_step(relationship),
         step("Work out the equal share per person, me included.",
              f"share = round({total} / (len(contacts) + 1), 2)\nprint(share)"),
         login_step("venmo"),
         step("Send each of them a payment request for their share.",
              "for contact in contacts:\n"
              f'    apis.venmo.create_payment_request(user_email=contact["email"], amount=share, description="{occasion}", '
              "access_token=venmo_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "venmo.PaymentRequest",
                 "records": [{"sender_id": sup.id, "receiver_id": p, "amount": share, "description": occasion}
                             for p in people],
                 "requirement": f"each {relationship} was asked for {money(share)} for '{occasion}', and nobody else"},
                only_changed_check(["venmo.PaymentRequest", "venmo.Notification"]),
                completed_check()])


@scenario("remindrequests", difficulty=2, apps=("venmo", "todoist"))
def remind_pending_requests(rng, pop, sup):
    pending = [r for r in pop.requests_of(sup) if r.sender_id == sup.id and r.status == "pending"]
    titles = [f"Remind {pop.person(r.receiver_id).first_name} about ${int(r.amount)}" for r in pending]
    inbox = next(p for p in pop.projects if p.owner_id == sup.id and p.is_inbox)
    return Gold(
        "For each Venmo payment request I sent that is still pending, add a task to my Todoist Inbox titled "
        "'Remind <first name> about $<amount>', e.g. 'Remind Alex about $20'.",
        [login_step("venmo"),
         step("Collect the payment requests I sent that are still pending, page by page.",
              paged("requests", 'apis.venmo.show_sent_payment_requests(status="pending", access_token=venmo_token, {page})')
              + 'print([(r["receiver"]["name"], r["amount"]) for r in requests])'),
         login_step("todoist"),
         step("Find my Todoist Inbox project.",
              FIND_PROJECTS + 'inbox_id = next(p["project_id"] for p in projects if p["is_inbox"])'),
         step("Add one reminder task per pending request.",
              "for request in requests:\n"
              '    first_name = request["receiver"]["name"].split()[0]\n'
              '    title = f"Remind {first_name} about ${int(request[\'amount\'])}"\n'
              "    apis.todoist.create_task(project_id=inbox_id, title=title, access_token=todoist_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "todoist.Task",
                 "records": [{"project_id": inbox.id, "title": t} for t in titles],
                 "requirement": "one Inbox reminder task was added per pending sent request, and no other task"},
                only_changed_check(["todoist.Task"]),
                completed_check()])


@scenario("birthdaygift", difficulty=3, apps=("phone", "venmo"), held_out=True)
def birthday_money(rng, pop, sup):
    months = Counter(int(pop.person(c.person_id).birthday[5:7]) for c in pop.contacts_of(sup))
    month = rng.choice(sorted(months))
    people = [c.person_id for c in pop.contacts_of(sup) if int(pop.person(c.person_id).birthday[5:7]) == month]
    amount = float(rng.choice((10, 15, 20, 25)))
    name = date(2023, month, 1).strftime("%B")
    return Gold(
        f"Send {money(amount)} on Venmo to each of my phone contacts whose birthday is in {name}, "
        "with the note 'Happy birthday!'.",
        [login_step("phone"),
         contacts_step(),
         step(f"Keep the contacts born in {name}.",
              f'birthday_people = [c for c in contacts if c["birthday"] and c["birthday"][5:7] == "{month:02d}"]\n'
              'print([c["first_name"] for c in birthday_people])'),
         login_step("venmo"),
         step(f"Send each of them {money(amount)} with the note 'Happy birthday!'.",
              "for contact in birthday_people:\n"
              f'    apis.venmo.create_transaction(receiver_email=contact["email"], amount={amount}, '
              'description="Happy birthday!", access_token=venmo_token)'),
         finish_step()],
        checks=[{"kind": "added", "model": "venmo.Transaction",
                 "records": [{"sender_id": sup.id, "receiver_id": p, "amount": amount, "description": "Happy birthday!"}
                             for p in people],
                 "requirement": f"every contact born in {name} got {money(amount)} with the note, and nobody else"},
                only_changed_check(["venmo.Transaction", "venmo.User", "venmo.Notification"]),
                completed_check()])


@scenario("notetotasks", difficulty=2, apps=("simple_note", "todoist"), held_out=True)
def note_items_to_tasks(rng, pop, sup):
    note = rng.choice([n for n in pop.notes_of(sup) if len(n.lines) <= 7])
    project = rng.choice(pop.projects_of(sup))
    return Gold(
        f"Create a task in my Todoist project '{project.name}' for every item on my '{note.title}' note in "
        "Simple Note, using the item text as the task title.",
        [login_step("simple_note"),
         note_lookup(note.title),
         step("Turn the note's lines into item texts (drop the leading '- ').",
              'items = [line.strip().lstrip("-").strip() for line in note["content"].splitlines() if line.strip()]\n'
              "print(items)"),
         login_step("todoist"),
         step(f"Find my Todoist project '{project.name}'.",
              FIND_PROJECTS + f'project_id = next(p["project_id"] for p in projects if p["name"] == "{project.name}")'),
         step("Create one task per item.",
              "for item in items:\n"
              "    apis.todoist.create_task(project_id=project_id, title=item, access_token=todoist_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "todoist.Task",
                 "records": [{"project_id": project.id, "title": line} for line in note.lines],
                 "requirement": f"one task per item of '{note.title}' was added to '{project.name}', and no other task"},
                only_changed_check(["todoist.Task"]),
                completed_check()])


@scenario("helperthanks", difficulty=3, apps=("todoist", "phone", "venmo"))
def thank_helper(rng, pop, sup):
    today = NOW.date()
    upcoming = [t for t in pop.tasks if t.owner_id == sup.id and not t.is_completed and t.due_date >= today]
    anchor = rng.choice(upcoming)
    project = next(p for p in pop.projects if p.id == anchor.project_id)
    end = anchor.due_date + timedelta(days=rng.randint(0, 3))
    titles = [t.title for t in pop.tasks_in(project) if not t.is_completed and today <= t.due_date <= end]
    contact = rng.choice(pop.contacts_of(sup))
    helper = pop.person(contact.person_id)
    amount = float(rng.choice((20, 25, 30, 40, 50)))
    note = f"Thanks for helping with {project.name}"
    return Gold(
        f"My {contact.relationship} {helper.name} is helping me with my Todoist project '{project.name}'. Text "
        f"them the titles of its unfinished tasks due from today through {long_date(end)}, one per line, in the "
        f"order Todoist lists them; then send them {money(amount)} on Venmo with the note '{note}'.",
        [login_step("todoist"),
         step(f"List the unfinished tasks of '{project.name}' due from today through {end.isoformat()}.",
              FIND_PROJECTS + f'project_id = next(p["project_id"] for p in projects if p["name"] == "{project.name}")\n'
              "tasks = apis.todoist.show_tasks(project_id=project_id, access_token=todoist_token)"
              '["no_section_tasks"]\n'
              'today = DateTime.now().strftime("%Y-%m-%d")\n'
              'titles = [t["title"] for t in tasks if not t["is_completed"] and t["due_date"]\n'
              f'          and today <= t["due_date"][:10] <= "{end.isoformat()}"]\nprint(titles)'),
         login_step("phone"),
         step(f"Find {helper.name} in my phone contacts.",
              f'matches = apis.phone.search_contacts(query="{helper.name}", access_token=phone_token)\n'
              f'helper = next(c for c in matches if c["first_name"] == "{helper.first_name}" '
              f'and c["last_name"] == "{helper.last_name}")\nprint(helper)'),
         step("Text them the task titles, one per line.",
              'apis.phone.send_text_message(phone_number=helper["phone_number"], message="\\n".join(titles), '
              "access_token=phone_token)"),
         login_step("venmo"),
         step(f"Send them {money(amount)} with the note '{note}'.",
              f'apis.venmo.create_transaction(receiver_email=helper["email"], amount={amount}, description="{note}", '
              "access_token=venmo_token)"),
         finish_step()],
        checks=[{"kind": "added", "model": "phone.GlobalTextMessage",
                 "records": [{"sender_id": sup.id, "receiver_id": helper.id, "message": {"lines": titles}}],
                 "requirement": f"{helper.name} got one text listing exactly those task titles in order"},
                {"kind": "added", "model": "venmo.Transaction",
                 "records": [{"sender_id": sup.id, "receiver_id": helper.id, "amount": amount, "description": note}],
                 "requirement": f"{helper.name} was sent {money(amount)} with the note '{note}'"},
                only_changed_check(["phone.GlobalTextMessage", "phone.UserTextMessage", "venmo.Transaction",
                                    "venmo.User", "venmo.Notification"]),
                completed_check()])


# ======================================================================================================
# The one evaluation.py every mini-world task ships. AppWorld's evaluator imports it and calls
# evaluate(test, public_data, private_data, main_user, models, ground_truth_answer); each check in
# private_data becomes one requirement, whose text equals the matching test_data.json entry.
# ======================================================================================================

EVALUATION_PY = '''\
"""Generic prost mini-world checker: every requirement is a declarative check from private_data.json."""
import json
import re


def _norm_lines(text):
    """Non-empty lines, lower-cased, without list bullets or numbering ("- a", "* a", "1. a", "2) a")."""
    lines = [re.sub(r"^(?:[-*\\u2022]|\\d+[.)])\\s*", "", line.strip()).lower() for line in str(text).splitlines()]
    return [line for line in lines if line]


def _same(got, want):
    if isinstance(want, dict) and "lines" in want:  # same non-empty lines in the same order
        return _norm_lines(got) == [line.lower() for line in want["lines"]]
    if isinstance(want, dict) and "contains" in want:
        return str(want["contains"]).lower() in str(got).lower()
    if isinstance(want, dict) and "set" in want:
        return (got is not None) == bool(want["set"])
    if isinstance(want, dict) and "date" in want:
        return got is not None and str(got)[:10] == want["date"]
    if isinstance(want, float) or isinstance(got, float):
        return got is not None and abs(float(got) - float(want)) < 0.005
    if isinstance(want, str):
        return str(got).strip().lower() == want.strip().lower()
    if isinstance(want, list):
        return sorted(map(str, got or [])) == sorted(map(str, want))
    return got == want


def _matches(record, fields):
    return all(_same(getattr(record, key), want) for key, want in fields.items())


def _active_task(models):
    return models.end.supervisor.Task.all()[0]


def check_answer(check, models, ground_truth_answer, test):
    test.answer(json.loads(_active_task(models).answer), ground_truth_answer)


def check_no_answer(check, models, ground_truth_answer, test):
    task = _active_task(models)
    assert task.status == "success", f"task status is {task.status!r}"
    assert json.loads(task.answer) is None, f"expected no answer, got {task.answer}"


def check_added(check, models, ground_truth_answer, test):
    added, _, _ = models.changed_records(check["model"])
    unmatched = list(added)
    for fields in check["records"]:
        found = next((record for record in unmatched if _matches(record, fields)), None)
        assert found is not None, f"no added {check['model']} record matches {dict(fields)}"
        unmatched.remove(found)
    assert not unmatched, f"{len(unmatched)} unexpected {check['model']} record(s) were added"


def check_updated(check, models, ground_truth_answer, test):
    _, updated, _ = models.changed_records(check["model"])
    expected = {int(record_id): fields for record_id, fields in check["records"].items()}
    test.case(sorted(record.id for record in updated), "==", sorted(expected))
    for record in updated:
        assert _matches(record, expected[record.id]), f"{check['model']} {record.id} lacks {dict(expected[record.id])}"


def check_removed(check, models, ground_truth_answer, test):
    _, _, removed = models.changed_records(check["model"])
    test.case(sorted(record.id for record in removed), "==", sorted(check["ids"]))


def check_only_changed(check, models, ground_truth_answer, test):
    unexpected = sorted(set(models.changed_model_names()) - set(check["allowed"]))
    test.case(unexpected, "==", [])


CHECKS = {
    "answer": check_answer,
    "no_answer": check_no_answer,
    "added": check_added,
    "updated": check_updated,
    "removed": check_removed,
    "only_changed": check_only_changed,
}


def evaluate(test, public_data, private_data, main_user, models, ground_truth_answer):
    for check in private_data["checks"]:
        with test(check["requirement"]):
            CHECKS[check["kind"]](check, models, ground_truth_answer, test)
'''

NO_OP_PASS_KINDS = {"only_changed"}  # checks that already hold when the agent does nothing


# ======================================================================================================
# Building the data root.
# ======================================================================================================


def task_ids_by_split() -> dict[str, list[str]]:
    splits: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for sc in SCENARIOS.values():
        if sc.held_out:
            splits["test"] += [f"{sc.name}_{v}" for v in range(1, TEST_VARIANTS + 1)]
        else:
            splits["train"] += [f"{sc.name}_{v}" for v in range(1, TRAIN_VARIANTS + 1)]
            splits["dev"] += [f"{sc.name}_{v}" for v in range(TRAIN_VARIANTS + 1, TRAIN_VARIANTS + DEV_VARIANTS + 1)]
    return splits


def generate_tasks(pop: Population, seed: int, secret: str = "") -> dict[str, tuple[Scenario, Person, Gold]]:
    """Every task of every split: scenario, supervisor (a different person per variant) and gold. The held-out
    variants (dev and test) are drawn from the build's secret too, so that code knowing the generator and the
    seed, but not the secret, cannot rebuild their answers; train's follow from the seed alone."""
    tasks = {}
    for sc in SCENARIOS.values():
        n_variants = TEST_VARIANTS if sc.held_out else TRAIN_VARIANTS + DEV_VARIANTS
        sup_rng = random.Random(f"prost-{seed}-{sc.name}-supervisors")
        supervisors = sup_rng.sample(pop.supervisors, n_variants)
        for variant, supervisor in enumerate(supervisors, start=1):
            held_out = sc.held_out or variant > TRAIN_VARIANTS
            rng = random.Random(f"prost-{seed}-{secret}-{sc.name}-{variant}" if held_out
                                else f"prost-{seed}-{sc.name}-{variant}")
            gold = sc.make(rng, pop, supervisor)
            if not 2 <= len(gold.subtasks) <= 8:
                raise RuntimeError(f"{sc.name}: {len(gold.subtasks)} sub-tasks, expected 2 to 8")
            tasks[f"{sc.name}_{variant}"] = (sc, supervisor, gold)
    return tasks


def solution_stats(subtasks: list[dict[str, str]]) -> dict[str, int]:
    code = "\n".join(s["code"] for s in subtasks)
    calls = re.findall(r"apis\.(\w+)\.(\w+)\(", code)
    return {"num_apps": len({app for app, _ in calls} - {"supervisor"}),
            "num_apis": len(set(calls)),
            "num_api_calls": len(calls),
            "num_solution_code_lines": len([line for line in code.splitlines() if line.strip()])}


def _write_ground_truth(gt_dir: Path, sc: Scenario, gold: Gold) -> None:
    test_data = [{"requirement": c["requirement"],
                  "label": "no_op_pass" if c["kind"] in NO_OP_PASS_KINDS else "no_op_fail"} for c in gold.checks]
    _write_json(gt_dir / "metadata.json", {"mode": "minimal", "difficulty": sc.difficulty,
                                           **solution_stats(gold.subtasks), "scenario": sc.name})
    _write_json(gt_dir / "public_data.json", {})
    _write_json(gt_dir / "private_data.json", {"checks": gold.checks})
    _write_text(gt_dir / "answer.json", json.dumps(gold.answer) + "\n")
    _write_json(gt_dir / "test_data.json", test_data)
    _write_text(gt_dir / "evaluation.py", EVALUATION_PY)
    _write_json(gt_dir / GOLD_FILE, gold.subtasks)


def _write_task_db_changes(dbs_dir: Path, task_id: str, base_dir: Path, supervisor: Person, instruction: str) -> None:
    """The task's starting state = base DBs + these change logs (the supervisor app's rows)."""
    from appworld.apps import get_all_apps
    from appworld.apps.model_lib import CachedDBHandler
    from appworld.collections.models import ModelCollection

    # Only the supervisor app changes, so only it is loaded; every other app gets an empty change log
    # (an absent log would make AppWorld start that app from an empty database).
    memory_home = f":memory:prostbuild-{task_id}"
    models = ModelCollection.load(to_db_home_path=memory_home, from_db_home_path=str(base_dir),
                                  load_apps=["supervisor"], skip_mandatory_apps=True)
    sv = models.supervisor
    boss = sv.Supervisor.create_save(first_name=supervisor.first_name, last_name=supervisor.last_name,
                                     email=supervisor.email, phone_number=supervisor.phone_number,
                                     birthday=supervisor.birthday, sex=supervisor.sex)
    sv.Task.create_save(supervisor_id=boss.id, instruction=instruction)
    for app in APPS:
        sv.AccountPassword.create_save(supervisor_id=boss.id, account_name=app, password=supervisor.passwords[app])
    models.save(str(dbs_dir), format="changes", app_names=["supervisor"], delete_if_exists=True,
                skip_mandatory_apps=True)
    CachedDBHandler.reset(memory_home)
    for app in get_all_apps():
        (dbs_dir / f"{app}.jsonl").touch()


def _build_in_process(root: str, seed: int, secret: str) -> dict:
    """The whole build; runs in a fresh process because appworld caches APPWORLD_ROOT at import."""
    staging = Path(root) / ".building"
    shutil.rmtree(staging, ignore_errors=True)
    data_dir = staging / "data"
    base_dir = data_dir / "base_dbs"
    base_dir.mkdir(parents=True)
    os.environ["APPWORLD_ROOT"] = str(staging)
    from appworld.apps import get_all_apps
    from appworld.collections.models import ModelCollection
    from appworld.common.utils import freeze_time

    pop = make_population(seed)
    tasks = generate_tasks(pop, seed, secret)
    docs = _write_api_docs(data_dir)
    with freeze_time(SEED_TIME):
        models = ModelCollection.load(to_db_home_path=":memory:prostbase", load_apps=get_all_apps(), create_db=True)
        _insert_people(models, pop)
        _insert_spotify(models, pop)
        _insert_venmo(models, pop)
        _insert_notes_and_todos(models, pop)
        _insert_phone(models, pop)
        _insert_api_docs(models, docs)
        models.save(str(base_dir), format="full", delete_if_exists=True)
        for task_id, (sc, supervisor, gold) in tasks.items():
            task_dir = data_dir / "tasks" / task_id
            _write_json(task_dir / "specs.json", {
                "instruction": gold.instruction,
                "supervisor": {"first_name": supervisor.first_name, "last_name": supervisor.last_name,
                               "email": supervisor.email, "phone_number": supervisor.phone_number},
                "datetime": NOW.isoformat(), "db_version": DB_VERSION})
            _write_task_db_changes(task_dir / "dbs", task_id, base_dir, supervisor, gold.instruction)
            _write_ground_truth(task_dir / "ground_truth", sc, gold)
    for split, ids in task_ids_by_split().items():
        _write_text(data_dir / "datasets" / f"{split}.txt", "".join(f"{i}\n" for i in ids))
    _write_json(data_dir / MARKER_FILE, {"generator": "prost miniworld.py", "seed": seed, "secret": secret})
    final = Path(root) / "data"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(data_dir, final)
    shutil.rmtree(staging, ignore_errors=True)
    return world_summary(tasks)


def world_summary(tasks: dict[str, tuple[Scenario, Person, Gold]]) -> dict:
    splits = task_ids_by_split()
    return {
        "scenarios": {"train/dev": sum(not s.held_out for s in SCENARIOS.values()),
                      "test": sum(s.held_out for s in SCENARIOS.values())},
        "tasks": {split: len(ids) for split, ids in splits.items()},
        "apps": sorted({app for s in SCENARIOS.values() for app in s.apps}),
        "difficulty": dict(sorted(Counter(s.difficulty for s, _, _ in tasks.values()).items())),
        "subtasks": dict(sorted(Counter(len(g.subtasks) for _, _, g in tasks.values()).items())),
        "question_tasks": sum(g.answer is not None for _, _, g in tasks.values()),
        "multi_app_tasks": sum(len(s.apps) > 1 for s, _, _ in tasks.values()),
    }


def build_world(root: str | Path = DEFAULT_ROOT, seed: int = 0, secret: str | None = None) -> dict:
    """Write a complete AppWorld data root at `root` (its data/ folder is replaced); returns a summary.
    secret: what the held-out variants are drawn from besides the seed (see generate_tasks); by default the one
    a mini-world already at `root` was built with (so a rebuild is byte-identical), else a fresh random one. It is
    kept in <root>/data/prost_miniworld.json, which agent code, locked in, cannot read."""
    root = Path(root).resolve()
    data = root / "data"
    if data.is_dir() and any(data.iterdir()) and not (data / MARKER_FILE).is_file():
        raise ValueError(f"{data} holds data that is not a prost mini-world (e.g. AppWorld's own download); "
                         "refusing to replace it: choose another --root")
    if secret is None:
        marker = json.loads((data / MARKER_FILE).read_text()) if (data / MARKER_FILE).is_file() else {}
        secret = marker.get("secret") if marker.get("seed") == seed else None
        secret = secret or secrets.token_hex(16)
    root.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_build_in_process, (str(root), seed, secret))




def gold_subtasks(task_id: str, root: str | Path | None = None) -> list[dict[str, str]]:
    """The gold solution as ordered sub-tasks [{text, code}] (mini-world tasks only)."""
    path = task_dir(task_id, root) / "ground_truth" / GOLD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"task {task_id!r} has no gold sub-tasks ({path} missing): they exist only "
                                "in the prost mini-world, not in AppWorld's own data")
    return json.loads(path.read_text())



def check_gold(root: str | Path | None = None, splits: tuple[str, ...] = ("train", "dev", "test"),
               workers: int = 2) -> dict[str, list[str]]:
    """Run every gold solution sub-task by sub-task and evaluate it; returns {split: failed task ids}."""
    def run(session: WorldSession, task_id: str) -> bool:
        codes = [s["code"] for s in gold_subtasks(task_id, session.root)]
        executions, evaluation = run_codes(session, task_id, codes)
        return evaluation.success and not any(e.error for e in executions)

    failed = {}
    with WorldPool(workers, root=root, unsafe_weak_sandbox=True) as pool:  # gold code: ours, not a model's
        for split in splits:
            ids = load_split(split, root)
            failed[split] = [t for t, ok in zip(ids, pool.map(run, ids)) if not ok]
    return failed


def show_task(task_id: str, root: str | Path | None = None) -> str:
    """A readable view of one mini-world task: instruction, metadata and gold sub-tasks."""
    specs = json.loads((task_dir(task_id, root) / "specs.json").read_text())
    lines = [f"{task_id}: {specs['instruction']}", f"supervisor: {specs['supervisor']['first_name']} "
             f"{specs['supervisor']['last_name']}; metadata: {json.dumps(task_metadata(task_id, root))}"]
    for index, sub in enumerate(gold_subtasks(task_id, root), start=1):
        lines += [f"\n[{index}] {sub['text']}", sub["code"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="prost mini-world: a synthetic AppWorld data root and its checks.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="generate the data root (replaces <root>/data if it is a mini-world)")
    build.add_argument("--root", default=str(DEFAULT_ROOT), help="AppWorld root to write (default: miniworld/)")
    build.add_argument("--seed", type=int, default=0, help="seed for people, content and task variants")
    build.add_argument("--secret", default=None, help="what dev and test variants are drawn from besides the seed "
                       "(default: the secret of the mini-world already at --root, else a fresh random one); give "
                       "a past build's (data/prost_miniworld.json) to rebuild it exactly")
    check = sub.add_parser("check", help="run every gold solution through AppWorld's evaluator")
    check.add_argument("--root", default=None, help="AppWorld root (default: $APPWORLD_ROOT or miniworld/)")
    check.add_argument("--split", action="append", help="split to check (repeatable; default: train, dev, test)")
    check.add_argument("--workers", type=int, default=2, help="world worker processes")
    show = sub.add_parser("show", help="print a task's instruction and gold sub-tasks")
    show.add_argument("task_id", help="task id, e.g. payfriend_1")
    show.add_argument("--root", default=None, help="AppWorld root (default: $APPWORLD_ROOT or miniworld/)")
    args = parser.parse_args(argv)
    try:
        started = time.perf_counter()
        if args.command == "build":
            summary = build_world(args.root, args.seed, args.secret)
            summary["seconds"] = round(time.perf_counter() - started, 1)
            print(json.dumps(summary, indent=2))
        elif args.command == "check":
            failed = check_gold(args.root, tuple(args.split or ("train", "dev", "test")), args.workers)
            for split, ids in failed.items():
                print(f"{split}: {len(load_split(split, args.root)) - len(ids)}/{len(load_split(split, args.root))} "
                      f"gold solutions pass" + (f"; failed: {', '.join(ids)}" if ids else ""))
            print(f"[{time.perf_counter() - started:.0f} s]")
            return 1 if any(failed.values()) else 0
        else:
            print(show_task(args.task_id, args.root))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
