"""Streams in flight when a server is stopped (chapters 03 on): each must end with an error event, not be cut off.

``open_streams(server, count)`` starts ``count`` long streamed completions, each in a thread that records how its
stream ended, and returns once every one has produced text; then the test stops the server and checks
``outcomes == ["error event"] * count``.
"""

import threading

import httpx


def open_streams(server, count: int, max_tokens: int = 480) -> tuple[list[threading.Thread], list[str]]:
    outcomes: list[str] = []
    generating = threading.Semaphore(0)
    body = {"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}

    def run():
        signalled = False
        try:
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as response:
                lines = []
                for line in response.iter_lines():
                    lines.append(line)
                    if not signalled and '"text": "' in line and '"text": ""' not in line:
                        generating.release()
                        signalled = True
                outcomes.append("error event" if any('"error"' in line for line in lines) else
                                "done" if "data: [DONE]" in lines else "cut off")
        except httpx.HTTPError as error:
            outcomes.append(f"closed ({type(error).__name__})")
        finally:
            if not signalled:
                generating.release()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    for _ in range(count):
        assert generating.acquire(timeout=120), "a stream produced no text"
    return threads, outcomes


def ended_with_error_events(threads: list[threading.Thread], outcomes: list[str]) -> bool:
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a stream still hangs"
    return outcomes == ["error event"] * len(threads)
