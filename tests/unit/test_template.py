"""
A profile's C{template} applied to requests: sampler defaults, the system prompt and the time
stamp.
"""

from __future__ import annotations

import copy
import os
import re
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.template import applyRequestDefaults, applySystemPrompt, timeStamp

# 2026-11-26 13:03:12 UTC, a Thursday.
FIXED = datetime(2026, 11, 26, 13, 3, 12, tzinfo=timezone.utc)


def fixedNow() -> datetime:
    return FIXED


def useTimeZone(testCase: SynchronousTestCase, tz: str) -> None:
    """
    Make C{tz} the process's local zone for the rest of C{testCase}.
    """
    previous = os.environ.get("TZ")

    def restore() -> None:
        if previous is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = previous
        time.tzset()

    testCase.addCleanup(restore)
    os.environ["TZ"] = tz
    time.tzset()


class ApplyRequestDefaultsTests(SynchronousTestCase):
    """
    L{applyRequestDefaults} fills in what the request did not set.
    """

    def test_missingKeysFilled(self) -> None:
        """
        Template defaults the request does not mention are copied into it.
        """
        body: dict[str, Any] = {"model": "qwen", "messages": []}
        applyRequestDefaults(body, {"temperature": 0.6, "top_p": 0.95, "top_k": 20})
        self.assertEqual(
            body,
            {"model": "qwen", "messages": [], "temperature": 0.6, "top_p": 0.95, "top_k": 20},
        )

    def test_requestValuesWin(self) -> None:
        """
        A value the request sets is kept, even a falsy one such as C{0}.
        """
        body: dict[str, Any] = {"temperature": 0, "top_p": 0.5}
        applyRequestDefaults(body, {"temperature": 0.6, "top_p": 0.95, "top_k": 20})
        self.assertEqual(body, {"temperature": 0, "top_p": 0.5, "top_k": 20})

    def test_noneCountsAsUnset(self) -> None:
        """
        A request key that is C{null} counts as unset and takes the template's default.
        """
        body: dict[str, Any] = {"temperature": None}
        applyRequestDefaults(body, {"temperature": 0.6})
        self.assertEqual(body, {"temperature": 0.6})

    def test_promptKeysNeverCopied(self) -> None:
        """
        C{system} and C{system_time} are about the system prompt, not request parameters.
        """
        body: dict[str, Any] = {}
        applyRequestDefaults(body, {"system": "Be nice.", "system_time": True, "top_k": 20})
        self.assertEqual(body, {"top_k": 20})

    def test_emptyTemplate(self) -> None:
        """
        An empty template leaves the request as it is.
        """
        body: dict[str, Any] = {"temperature": None, "model": "m"}
        applyRequestDefaults(body, {})
        self.assertEqual(body, {"temperature": None, "model": "m"})


class ApplySystemPromptTests(SynchronousTestCase):
    """
    L{applySystemPrompt} adds the profile's system prompt and time stamp to a chat.
    """

    def setUp(self) -> None:
        useTimeZone(self, "UTC0")
        self.stamp = timeStamp(FIXED)

    def test_insertedWhenNoSystemMessage(self) -> None:
        """
        Without a client system message, the template's C{system} becomes the first message.
        """
        messages = [{"role": "user", "content": "hi"}]
        result = applySystemPrompt(messages, {"system": "Be nice."}, fixedNow)
        self.assertEqual(
            result,
            [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hi"}],
        )

    def test_insertedWithTimeStamp(self) -> None:
        """
        With C{system_time}, the time stamp comes first, then a blank line, then the prompt.
        """
        messages = [{"role": "user", "content": "hi"}]
        result = applySystemPrompt(messages, {"system": "Be nice.", "system_time": True}, fixedNow)
        self.assertEqual(result[0], {"role": "system", "content": f"{self.stamp}\n\nBe nice."})
        self.assertEqual(result[1:], messages)

    def test_timeStampOnly(self) -> None:
        """
        C{system_time} without C{system} inserts a system message holding just the time stamp.
        """
        result = applySystemPrompt([{"role": "user", "content": "hi"}], {"system_time": True},
                                   fixedNow)
        self.assertEqual(result[0], {"role": "system", "content": self.stamp})

    def test_emptyChat(self) -> None:
        """
        An empty message list gets just the system message.
        """
        self.assertEqual(
            applySystemPrompt([], {"system": "Be nice."}, fixedNow),
            [{"role": "system", "content": "Be nice."}],
        )

    def test_clientSystemMessageKept(self) -> None:
        """
        A client's own system message wins over the template's C{system}: it is kept as it is.
        """
        messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
        result = applySystemPrompt(messages, {"system": "Be nice."}, fixedNow)
        self.assertEqual(
            result,
            [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        )

    def test_clientSystemMessageGetsTimeStamp(self) -> None:
        """
        With C{system_time}, only the time stamp is put in front of the client's own system
        message; the template's C{system} is not added, and other keys of the message survive.
        """
        messages = [
            {"role": "system", "content": "Be terse.", "name": "rules"},
            {"role": "user", "content": "hi"},
        ]
        result = applySystemPrompt(
            messages, {"system": "Be nice.", "system_time": True}, fixedNow
        )
        self.assertEqual(
            result,
            [
                {"role": "system", "content": f"{self.stamp}\n\nBe terse.", "name": "rules"},
                {"role": "user", "content": "hi"},
            ],
        )

    def test_nothingWithoutTemplateKeys(self) -> None:
        """
        A template without C{system} or C{system_time} (or with them empty or false) changes
        nothing.
        """
        messages = [{"role": "user", "content": "hi"}]
        templates: list[dict[str, Any]] = [
            {}, {"temperature": 0.5}, {"system": "", "system_time": False}
        ]
        for template in templates:
            self.assertEqual(applySystemPrompt(messages, template, fixedNow), messages)

    def test_clientMessagesNotMutated(self) -> None:
        """
        The client's list and message dicts are never changed in place.
        """
        messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}]
        before = copy.deepcopy(messages)
        result = applySystemPrompt(messages, {"system": "x", "system_time": True}, fixedNow)
        self.assertEqual(messages, before)
        self.assertIsNot(result[0], messages[0])

        userOnly = [{"role": "user", "content": "hi"}]
        beforeUser = copy.deepcopy(userOnly)
        applySystemPrompt(userOnly, {"system": "x", "system_time": True}, fixedNow)
        self.assertEqual(userOnly, beforeUser)

    def test_clockReadOnlyForTimeStamp(self) -> None:
        """
        The clock is only consulted when the template asks for the time.
        """
        calls: list[None] = []

        def countingNow() -> datetime:
            calls.append(None)
            return FIXED

        applySystemPrompt([], {"system": "x"}, countingNow)
        self.assertEqual(calls, [])
        applySystemPrompt([], {"system_time": True}, countingNow)
        self.assertEqual(calls, [None])


class TimeStampTests(SynchronousTestCase):
    """
    L{timeStamp}: the date and time line given to the model.
    """

    def test_formatInLocalZone(self) -> None:
        """
        The stamp gives the local time, the zone's abbreviation and offset, the date and the
        weekday.
        """
        useTimeZone(self, "CET-1CEST,M3.5.0,M10.5.0/3")
        self.assertEqual(
            timeStamp(FIXED), "Current time: 14:03:12 CET (+0100)\nToday: 2026-11-26 (Thursday)"
        )

    def test_summerTime(self) -> None:
        """
        Daylight saving time shows in the zone name and offset.
        """
        useTimeZone(self, "CET-1CEST,M3.5.0,M10.5.0/3")
        summer = datetime(2026, 7, 1, 22, 30, 0, tzinfo=timezone.utc)
        self.assertEqual(
            timeStamp(summer), "Current time: 00:30:00 CEST (+0200)\nToday: 2026-07-02 (Thursday)"
        )

    def test_convertsFromAnyZone(self) -> None:
        """
        The instant matters, not the zone the datetime came in.
        """
        useTimeZone(self, "UTC0")
        elsewhere = FIXED.astimezone(timezone(timedelta(hours=-7)))
        self.assertEqual(timeStamp(elsewhere), timeStamp(FIXED))
        self.assertEqual(
            timeStamp(FIXED), "Current time: 13:03:12 UTC (+0000)\nToday: 2026-11-26 (Thursday)"
        )

    def test_shape(self) -> None:
        """
        Whatever the machine's zone, the stamp has two lines of a fixed shape.
        """
        self.assertRegex(
            timeStamp(FIXED),
            re.compile(r"\ACurrent time: \d\d:\d\d:\d\d .*\([+-]\d{4}\)\nToday: "
                       r"\d{4}-\d\d-\d\d \([A-Z][a-z]+day\)\Z"),
        )
