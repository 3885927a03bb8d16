"""Sessions: a conversation's messages and its kvbound Chat (a KV cache on the shared pool), kept between requests;
which session a request continues (its `session_id`, or the session whose conversation the request's history
repeats); dropping an idle session's KV for others (`offload`) and bringing it back (`restore`). Every method runs
on the engine worker thread, which alone touches chats and the pool. A SessionStore (persistence) plugs in here:
a named session's recall archive lives in it, the other sessions' in process."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kvbound.chat.restore import restore_room
from kvbound.chat.session import Chat
from kvbound.config import CacheConfig
from kvbound.errors import KvboundError
from kvbound.memory.allocator import trim_heap
from kvbound.server.errors import ApiError, ServerBusy, SessionNotFound
from kvbound.server.protocol import SESSION_ID_PATTERN, new_id
from kvbound.server.spill import Spill

if TYPE_CHECKING:
    from kvbound.chat.archive import Archive
    from kvbound.chat.reply import Reply
    from kvbound.kvcache.pool import BlockPool
    from kvbound.llm import LLM
    from kvbound.server.settings import ServerSettings

logger = logging.getLogger("kvbound.server")
SESSION_ID = re.compile(SESSION_ID_PATTERN)
STORE_FILE = "sessions.sqlite3"
SPILL_DIR = "spill"  # under --data-dir
Conversation = list[dict[str, str]]  # [{"role", "content"}], roles system/user/assistant


class SessionStore(Protocol):
    """Persistence (kvbound.chat.persistence.SessionStore): sessions named by clients are created in it, saved after
    each answered turn (messages + KV snapshot + what their recall archive, kept in it, gained), loaded when unknown
    here, deleted with DELETE."""

    def create(self, session_id: str, system: str | None = None, config: dict[str, Any] | None = None) -> None: ...

    def save_turn(self, session_id: str, chat: Chat) -> int: ...

    def load(self, session_id: str, llm: "LLM", pool: "BlockPool | None" = None, **cache_options: Any) -> Chat: ...

    def get_messages(self, session_id: str) -> Conversation: ...

    def list(self) -> list[dict[str, Any]]: ...

    def delete(self, session_id: str) -> bool: ...

    def archive(self, session_id: str) -> "Archive": ...

    def report(self) -> dict[str, Any]: ...


def open_store(data_dir: Path) -> SessionStore:
    """The SessionStore of `kvbound serve --data-dir DIR` (one SQLite file in DIR)."""
    from kvbound.chat.persistence import SessionStore as SqliteStore

    data_dir = Path(data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvboundError(f"--data-dir {data_dir}: cannot create it ({e.strerror}); give a writable directory") \
            from None
    return SqliteStore(data_dir / STORE_FILE)


@dataclass
class Session:
    id: str
    system: str | None
    messages: Conversation  # what the client saw: the system prompt, then user/assistant turns
    chat: Chat | None  # None while offloaded (its KV went back to the pool; its messages stay) or not built yet
    explicit: bool  # named by a client (kept until deleted, persisted) or found by history (dropped first)
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    busy: bool = False  # a turn is running
    turns: int = 0
    offloads: int = 0
    last_reply: "Reply | None" = None
    owner: str | None = None  # the client that named it (server/handling.client_of), for its quota

    @property
    def state(self) -> str:
        if self.busy:
            return "answering"
        return "offloaded" if self.chat is None and self.turns else "idle"

    @property
    def kv_blocks(self) -> int:
        return self.chat.cache.num_blocks if self.chat is not None else 0

    @property
    def history(self) -> Conversation:
        """The turns after the system prompt."""
        return self.messages[1:] if self.system is not None else list(self.messages)


@dataclass
class Plan:
    """How a request continues: its session, the new user message, and how the session's KV is found."""

    session: Session
    user: str | None  # None: the reply answers the system prompt alone
    state: str  # "reused" (KV kept), "restored" (after an offload), "new", "rebuilt" (the client's history differs)
    created: bool = False


def split_system(conversation: Conversation) -> tuple[str | None, Conversation]:
    if conversation and conversation[0]["role"] == "system":
        return conversation[0]["content"] or None, conversation[1:]
    return None, conversation


def split_request(conversation: Conversation) -> tuple[str | None, Conversation, str | None]:
    """(system prompt, earlier turns, the new user message) of a chat request. A Chat takes one user message per
    turn, so user messages in a row at the end are sent as one, joined by a blank line; None when there is none
    (a system message alone, which the reply answers)."""
    system, turns = split_system(conversation)
    start = len(turns)
    while start and turns[start - 1]["role"] == "user":
        start -= 1
    return system, turns[:start], "\n\n".join(m["content"] for m in turns[start:]) if start < len(turns) else None


class SessionRegistry:
    def __init__(self, llm: "LLM", pool: "BlockPool", settings: "ServerSettings",
                 store: SessionStore | None = None):
        self.llm, self.pool, self.settings, self.store = llm, pool, settings, store
        self.cache_config = CacheConfig(**settings.cache_options())
        probe = llm.new_cache(self.cache_config, pool=pool)  # holds no block: read what every session's cache is
        self.capacity, self.evicts = probe.capacity, probe.policy.evicts
        self._sessions: dict[str, Session] = {}
        self.offloads_total = 0
        spill_bytes = settings.spill_bytes()
        self.spill = Spill(spill_bytes, Path(settings.data_dir) / SPILL_DIR if settings.data_dir else None) \
            if spill_bytes else None

    # -- lookup -------------------------------------------------------------------------------------------------
    @staticmethod
    def check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise ApiError(400, f"session id {session_id!r} is not valid: use 1-64 letters, digits, '_' or '-'",
                           param="session_id", code="invalid_session_id")
        return session_id

    def get(self, session_id: str) -> Session:
        """The session, from memory or (its KV not restored until its next turn) from the store."""
        session = self._sessions.get(self.check_id(session_id))
        messages = self._stored_messages(session_id) if session is None else None
        if messages is not None:
            system, turns = split_system(messages)
            session = self._add(Session(session_id, system, messages, None, True,
                                        turns=sum(1 for m in turns if m["role"] == "assistant")))
        if session is None:
            raise SessionNotFound(f"no session '{session_id}'; create it with POST /v1/sessions or send a chat "
                                  "request with this session_id")
        return session

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def stored_ids(self) -> list[str]:
        """Ids the store holds that are not loaded."""
        ids = [entry["id"] for entry in self.store.list()] if self.store is not None else []
        return [i for i in ids if i not in self._sessions]

    def _stored_messages(self, session_id: str) -> Conversation | None:
        """The store's messages of a session (None: no store, or not in it)."""
        if self.store is None:
            return None
        try:
            return self.store.get_messages(session_id)
        except LookupError:  # the store's SessionNotFoundError
            return None

    def find(self, messages: Conversation) -> Session | None:
        """The idle session whose conversation is `messages` (a request's, before its new message), most recently
        used first: like llama.cpp's slot prompt cache, a client that resends the whole history continues it."""
        found = [s for s in self._sessions.values() if not s.busy and s.turns and s.messages == messages]
        return max(found, key=lambda s: s.last_used, default=None)

    # -- create / delete ----------------------------------------------------------------------------------------
    def create(self, session_id: str | None = None, system: str | None = None, explicit: bool = True,
               history: Conversation = (), owner: str | None = None) -> Session:
        """A session; its chat is made by `restore` (history is fed then, after the pool admitted the turn).
        `owner`: the client naming it, held to its quota of named sessions in memory (without a store)."""
        if session_id is not None and (self.check_id(session_id) in self._sessions
                                       or self._stored_messages(session_id) is not None):
            raise ApiError(409, f"session '{session_id}' already exists", param="session_id", code="session_exists")
        messages = ([{"role": "system", "content": system}] if system else []) + [dict(m) for m in history]
        self._check_quota(owner if explicit else None)
        session = self._add(Session(session_id or new_id("sess"), system or None, messages, None, explicit,
                                    turns=sum(1 for m in history if m["role"] == "assistant"), owner=owner))
        if explicit and self.store is not None:
            self.store.create(session.id, session.system, config=self.settings.cache_options())
        return session

    def delete(self, session_id: str) -> None:
        session = self._sessions.get(self.check_id(session_id))
        if session is None and self._stored_messages(session_id) is None:
            raise SessionNotFound(f"no session '{session_id}'")
        if session is not None and session.busy:
            raise ApiError(409, f"session '{session_id}' is answering a request; delete it after that ends",
                           param="session_id", code="session_busy")
        self._forget(session or Session(session_id, None, [], None, True))

    def _check_quota(self, owner: str | None) -> None:
        """Without a store, one client may name at most its quota of the sessions in memory: another client can
        still name its own (with --data-dir, idle named sessions move to disk and nobody is refused)."""
        if owner is None or self.store is not None:
            return
        quota = self.settings.client_session_quota()
        held = sum(1 for s in self._sessions.values() if s.explicit and s.owner == owner)
        if held >= quota:
            raise ServerBusy(f"this client (its API key, else its address) holds {held} named sessions, its quota "
                             f"(--sessions-per-client {quota}); delete some with DELETE /v1/sessions/{{id}}, or "
                             "serve with --data-dir to keep idle ones on disk", needed=1, available=0)

    def _add(self, session: Session) -> Session:
        limit = self.settings.max_sessions
        if session.explicit and self.store is None:
            # Named sessions cannot fill the server: an eighth of the slots stay for chats without a session id.
            cap = self.settings.named_sessions_cap()
            named = sum(1 for s in self._sessions.values() if s.explicit)
            if named >= cap:
                raise ServerBusy(f"the server holds {named} named sessions, the most it keeps in memory ({cap} of "
                                 f"--max-sessions {limit}; the rest stay for chats without a session_id); delete "
                                 "some with DELETE /v1/sessions/{id}, or serve with --data-dir to keep idle ones on "
                                 "disk", needed=1, available=0)
        if len(self._sessions) >= limit:
            self._drop_one()
        self._sessions[session.id] = session
        return session

    def _forget(self, session: Session) -> None:
        self._release_kv(session)
        if self.spill is not None:
            self.spill.discard(session.id)
        self._sessions.pop(session.id, None)
        if self.store is not None and session.explicit:
            self.store.delete(session.id)

    @staticmethod
    def _release_kv(session: Session) -> None:
        if session.chat is not None:
            session.chat.close()
            session.chat = None

    def _drop_one(self) -> None:
        """Make room for one more session: forget the least recently used idle session found by history, else
        (with a store) unload the least recently used idle named session from memory: the store keeps it, and its
        next request loads it again."""
        idle = [s for s in self._sessions.values() if not s.explicit and not s.busy]
        if not idle and self.store is not None:
            named = [s for s in self._sessions.values() if s.explicit and not s.busy]
            if named:
                unloaded = min(named, key=lambda s: s.last_used)
                self._release_kv(unloaded)
                if self.spill is not None:  # the store's snapshot brings it back
                    self.spill.discard(unloaded.id)
                self._sessions.pop(unloaded.id, None)
                return
        if not idle:
            raise ServerBusy(f"the server holds {len(self._sessions)} sessions, its limit; delete some with "
                             "DELETE /v1/sessions/{id}", needed=1, available=0)
        self._forget(min(idle, key=lambda s: s.last_used))

    # -- which session a request continues -------------------------------------------------------------------------
    def plan(self, conversation: Conversation, session_id: str | None, owner: str | None = None) -> Plan:
        """The session a chat request continues.

        With `session_id`: the session it names (created on first use). Its messages may be the whole conversation
        (the session's messages and one new user message) or only what is new (one user message, with or without
        the system prompt); a conversation that differs from the session's replaces it (rebuilt: one prefill of
        the client's history). Without: the idle session whose messages equal the request's history, else a new
        session that feeds the history. `restore` then makes its chat (after the pool admitted the turn)."""
        system, history, user = split_request(conversation)
        messages = ([{"role": "system", "content": system}] if system else []) + history
        if session_id is None:
            session = self.find(messages)
            if session is None:
                return Plan(self.create(None, system, explicit=False, history=history), user, "new", True)
            return Plan(session, user, self._kv_state(session))
        try:
            session = self.get(session_id)
        except SessionNotFound:
            return Plan(self.create(session_id, system, history=history, owner=owner), user, "new", True)
        if session.busy:
            raise ServerBusy(f"session '{session_id}' is answering another request; retry when it ends",
                             needed=1, available=0)
        if messages == session.messages or (not history and system in (None, session.system)):
            return Plan(session, user, self._kv_state(session))
        self._release_kv(session)  # the client's conversation is authoritative: feed it instead of the session's
        session.system, session.messages = system, messages
        session.turns = sum(1 for m in history if m["role"] == "assistant")
        return Plan(session, user, "rebuilt")

    @staticmethod
    def _kv_state(session: Session) -> str:
        return "reused" if session.chat is not None else "restored" if session.turns else "new"

    # -- offload / restore: the one pair to change for another way of keeping a session's KV ---------------------
    def offload(self, session: Session) -> None:
        """Give the session's KV blocks back to the pool; its messages stay, so `restore` can bring it back."""
        if session.chat is None:
            return
        chat = session.chat
        if self.spill is not None and chat.context_tokens:  # what `turn_tokens` needs, without reading the file
            log = chat.transcript
            self.spill.put(session.id, chat.export_state(), (chat.context_tokens, list(log.history), log.fed_text))
            trim_heap()  # the exported copy of the KV was on the heap: hand its pages back now
        self._release_kv(session)
        session.offloads += 1
        self.offloads_total += 1

    def restore(self, session: Session, reserve: int = 0) -> int:
        """Make the session's chat (a no-op if it has one); return the tokens computed to do so. From the store's
        snapshot of its last turn when that is its conversation (no prefill), else one prefill of its messages
        (Chat.from_messages; a conversation that leaves no room for `reserve` more tokens — the next message —
        keeps its newest turns), else (no turn yet) an empty
        chat that feeds the system prompt with its first message."""
        if session.chat is not None:
            return 0
        state = self.spill.take(session.id, session.messages) if self.spill is not None else None
        if state is not None:
            cache = self.llm.new_cache(self.cache_config, pool=self.pool)
            try:
                session.chat = Chat.from_state(self.llm, state, cache=cache, archive=self._archive(session))
            except BaseException:
                cache.free()
                raise
            finally:
                del state
                trim_heap()  # the state read back was copied into the pool
        elif session.explicit and session.turns and self._stored_messages(session.id) == session.messages:
            session.chat = self.store.load(session.id, self.llm, self.pool, **self.settings.cache_options())
        elif session.turns:
            cache = self.llm.new_cache(self.cache_config, pool=self.pool)
            try:
                session.chat = Chat.from_messages(self.llm, session.messages, cache, reserve=reserve,
                                                  recall=self.settings.recall_on(),
                                                  archive=self._archive(session, fresh=True))
            except BaseException:
                cache.free()
                raise
        else:
            session.chat = self.llm.chat(session.system, pool=self.pool, recall=self.settings.recall_on(),
                                         archive=self._archive(session, fresh=True), **self.settings.cache_options())
        chat = session.chat
        return 0 if chat.restored_from == "snapshot" else chat.context_tokens - chat.shared_prefix_tokens

    def _archive(self, session: Session, fresh: bool = False) -> "Archive | None":
        """The recall archive of a named session in the store (None: no store, or a session found by history,
        whose archive stays in process). `fresh`: emptied, for a chat fed its messages anew: the store's entries
        may be of a conversation the client replaced, and the turns the new chat leaves out are archived again."""
        if self.store is None or not session.explicit:
            return None
        archive = self.store.archive(session.id)
        if fresh:
            archive.clear()
        return archive

    def offload_idle(self, exclude: Session) -> bool:
        """Offload the least recently used idle session holding KV blocks; False if there is none."""
        idle = [s for s in self._sessions.values() if s is not exclude and not s.busy and s.kv_blocks]
        if not idle:
            return False
        self.offload(min(idle, key=lambda s: s.last_used))
        return True

    def turn_tokens(self, session: Session, user: str | None) -> tuple[int, int, int]:
        """(tokens the session's cache holds now — or will hold, restored from the spill —, tokens its next turn
        will feed for `user`, of which the new message's): what the new message adds to a chat that holds (or
        spilled) KV, else its conversation as `restore` feeds it (all of it, or the newest turns when it and the
        message would overflow the capacity)."""
        tokenizer = self.llm.tokenizer
        render = tokenizer.apply_chat_template
        message = [] if user is None else [{"role": "user", "content": user}]

        def appended(history: Conversation, fed_text: str) -> int | None:
            # As the chat computes its turn (chat/transcript.delta): the text past what its cache was fed, which
            # includes the end-of-turn marker a reply cut by max_tokens never generated.
            rendered = render(history + message, add_generation_prompt=True)
            return max(1, len(tokenizer.encode(rendered[len(fed_text):]))) \
                if fed_text and rendered.startswith(fed_text) else None

        if session.chat is not None and session.chat.context_tokens:
            chat = session.chat
            new = appended(chat.transcript.history, chat.transcript.fed_text)
            if new is None:
                full = len(tokenizer.encode(render(chat.messages + message, add_generation_prompt=True)))
                new = max(1, full - len(tokenizer.encode(render(chat.messages, add_generation_prompt=False))))
            return chat.context_tokens, new, new
        if self.spill is not None and session.chat is None and session.id in self.spill:
            held, history, fed_text = self.spill.note(session.id)
            new = appended(history, fed_text)
            if new is not None:  # restored, it holds its spilled KV (its blocks are still to reserve)
                return held, new, new
        full = len(tokenizer.encode(render(session.messages + message, add_generation_prompt=True)))
        if not session.turns:
            return 0, full, full
        history = len(tokenizer.encode(render(session.messages, add_generation_prompt=False)))
        new = max(1, full - history)
        fits = history + new + 1 <= self.capacity  # + the first generated token
        kept = history if fits else max(0, restore_room(self.capacity, new))  # Chat.from_messages' cut, at most
        return 0, kept + new, new

    # -- turns ------------------------------------------------------------------------------------------------------
    def begin(self, session: Session) -> None:
        session.busy = True
        session.last_used = time.time()

    def answered(self, session: Session, reply: "Reply") -> None:
        """A turn ended well: the session's messages are the chat's, and the store keeps the turn."""
        session.messages = [dict(m) for m in session.chat.messages]
        session.turns += 1
        session.last_reply = reply
        if self.store is not None and session.explicit:
            try:
                self.store.save_turn(session.id, session.chat)
            except Exception:  # noqa: BLE001 — the reply stands; the session lives on in memory
                logger.exception("session '%s': saving the turn to the store failed", session.id)

    def end(self, plan: Plan, answered: bool) -> None:
        """After any turn: the session is free again; a session found by history that never answered is dropped."""
        session = plan.session
        session.busy = False
        session.last_used = time.time()
        if not answered and plan.created and not session.explicit:
            self._forget(session)

    # -- reports ----------------------------------------------------------------------------------------------------
    def summary(self, session: Session) -> dict[str, Any]:
        chat = session.chat
        return {"id": session.id, "object": "session", "created": int(session.created),
                "last_used": int(session.last_used), "state": session.state, "explicit": session.explicit,
                "turns": session.turns, "message_count": len(session.messages),
                "kv_tokens": chat.context_tokens if chat else 0, "kv_bytes": chat.cache.nbytes if chat else 0,
                "offloads": session.offloads}

    def detail(self, session: Session) -> dict[str, Any]:
        chat, reply = session.chat, session.last_reply
        return {**self.summary(session), "system": session.system, "messages": session.messages,
                "summary": chat.summary if chat else "",
                "memory": chat.memory().to_dict() if chat else None,
                "last_receipt": reply.receipt if reply else None,
                "forecast": reply.forecast if reply else None}
