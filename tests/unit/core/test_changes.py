"""ChangeFeed: in-process wake-ups for waiters on stored records."""

from __future__ import annotations

import asyncio
import threading

from clonebox_core.changes import HOST_KIND, ChangeFeed, health_key, host_key, operation_key, vm_key


async def test_a_published_key_wakes_its_watch_and_no_other() -> None:
    feed = ChangeFeed()
    with feed.watch(vm_key("web")) as web, feed.watch(vm_key("db")) as db:
        feed.publish([vm_key("web")])
        assert await web.wait(5)
        assert not db.happened
        assert not await db.wait(0.01)
    assert feed.watched() == 0


async def test_a_change_published_between_the_read_and_the_wait_is_not_missed() -> None:
    feed = ChangeFeed()
    with feed.watch(operation_key("op-1")) as change:
        feed.publish([operation_key("op-1")])  # as if committed while the waiter read the store
        assert change.happened
        assert await change.wait(0)


async def test_kinds_are_distinct() -> None:
    feed = ChangeFeed()
    with feed.watch(health_key("web")) as change:
        feed.publish([vm_key("web"), operation_key("web")])
        assert not await change.wait(0.01)


async def test_publish_threadsafe_delivers_from_another_thread_once_bound() -> None:
    feed = ChangeFeed()
    with feed.watch(vm_key("web")) as change:
        feed.publish_threadsafe([vm_key("web")])  # not bound yet: dropped
        await asyncio.sleep(0.01)
        assert not change.happened
        feed.bind(asyncio.get_running_loop())
        t = threading.Thread(target=feed.publish_threadsafe, args=([vm_key("web")],))
        t.start()
        t.join()
        assert await change.wait(5)


async def test_publish_after_the_loop_closed_is_ignored() -> None:
    feed = ChangeFeed()
    loop = asyncio.new_event_loop()
    feed.bind(loop)
    loop.close()
    feed.publish_threadsafe([vm_key("web")])  # must not raise: the process is stopping


async def test_one_watch_on_several_keys_and_cleanup_after_an_exception() -> None:
    feed = ChangeFeed()
    try:
        with feed.watch(vm_key("web"), health_key("web")) as change:
            feed.publish([health_key("web")])
            assert await change.wait(5)
            raise RuntimeError("the waiter failed")
    except RuntimeError:
        pass
    assert feed.watched() == 0


async def test_subscribers_hear_every_key_of_their_kind() -> None:
    feed = ChangeFeed()
    hosts: list[str] = []
    vms: list[str] = []
    feed.subscribe(HOST_KIND, lambda key: hosts.append(key.name))
    feed.subscribe("vm", lambda key: vms.append(key.name))
    feed.publish([host_key("h1"), vm_key("web"), health_key("web"), host_key("h2")])
    assert hosts == ["h1", "h2"] and vms == ["web"]
    feed.bind(asyncio.get_running_loop())
    t = threading.Thread(target=feed.publish_threadsafe, args=([host_key("h3")],))
    t.start()
    t.join()
    await asyncio.sleep(0.05)
    assert hosts == ["h1", "h2", "h3"]
