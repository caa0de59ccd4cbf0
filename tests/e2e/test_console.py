"""The management console in real headless Chromium against a real broker process.

Each view renders; the DLQ redrive flow (filter, dry-run preview, confirm, the message
delivered again to its group) and the transaction resolve flow (an unresolved
transaction committed from the page, then delivered) work end to end. Screenshots go to
``tests/artifacts/console/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections.abc import Callable, Iterator

import grpc
import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from kiteq.client import Binding, Consumer, Message, Producer, ReceivedMessage, TxStatus
from kiteq.core.admin import ADMIN_SECRET_HEADER
from kiteq.proto.v1 import admin_pb2, admin_pb2_grpc
from tests._servers import unavailable
from tests.e2e.broker_process import REPO, BrokerProcess, write_config
from tests.e2e.collector import Collector
from tests.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SECRET = "console-e2e-secret"
ARTIFACTS = REPO / "tests" / "artifacts" / "console"
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
N = 5  # dead letters the redrive moves
WAIT = 30.0  # seconds a page element may take (two shared cores)


def _find(names: tuple[str, ...]) -> str | None:
    return next((path for name in names if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    binary, driver = _find(CHROMIUM), _find(("chromedriver",))
    if binary is None or driver is None:
        unavailable("Chromium and chromedriver (Debian: chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,1000"):
        options.add_argument(flag)
    options.add_argument("--disable-dev-shm-usage")  # small /dev/shm in containers
    try:
        chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    except WebDriverException as exc:
        unavailable(f"a working headless Chromium ({exc.msg})")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield chrome
    finally:
        chrome.quit()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A broker with an admin secret, the ops port open and fast transaction checks."""
    directory = tmp_path_factory.mktemp("console")
    config = write_config(
        directory,
        db=f"rocksdb://{directory / 'db'}?fsync=batch",
        extra={
            "adminSecret": SECRET,
            "txCheckDelaySeconds": 1,
            "txCheckIntervalSeconds": 1,
            "txCheckMax": 2,
        },
    )
    process = BrokerProcess(config, pport=0, admin_secret=SECRET)
    process.start()
    try:
        yield process
    finally:
        process.stop_quietly()


def console_url(broker: BrokerProcess, view: str = "") -> str:
    return f"{broker.ops_url}/" + (f"#{view}" if view else "")


def wait(browser: webdriver.Chrome, condition: Callable[[webdriver.Chrome], object]) -> None:
    WebDriverWait(browser, WAIT, poll_frequency=0.1).until(condition)


def text_in(element_id: str, text: str) -> Callable[[webdriver.Chrome], bool]:
    return expected_conditions.text_to_be_present_in_element((By.ID, element_id), text)


def table_rows(browser: webdriver.Chrome, table_id: str) -> list[list[str]]:
    # one script call reads the whole table: a live view may re-render it between calls
    rows: list[list[str]] = browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0]),"
        " (tr) => Array.from(tr.cells, (td) => td.innerText.trim()))",
        f"#{table_id} tbody tr",
    )
    return rows


def rows_where(
    table_id: str, predicate: Callable[[list[str]], bool]
) -> Callable[[webdriver.Chrome], bool]:
    def check(browser: webdriver.Chrome) -> bool:
        return any(predicate(row) for row in table_rows(browser, table_id))

    return check


def click_in_row(browser: webdriver.Chrome, rows: str, first_cell: str, button: str) -> None:
    """Click *button* in the row of *rows* whose first cell reads *first_cell*.

    One script call finds it: a live view may re-render the table between two WebDriver
    calls, leaving a found element stale. The click runs after the script has returned,
    as it may open a confirm dialog.
    """
    clicked = browser.execute_script(
        "for (const tr of document.querySelectorAll(arguments[0])) {"
        " if (tr.cells[0].innerText.trim() === arguments[1]) {"
        "  const button = tr.querySelector(arguments[2]);"
        "  setTimeout(() => button.click(), 0); return true; } }"
        " return false;",
        rows,
        first_cell,
        button,
    )
    assert clicked, f"no row {first_cell!r} with {button!r} in {rows!r}"


def shot(browser: webdriver.Chrome, name: str) -> None:
    assert browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def visible(browser: webdriver.Chrome, element_id: str) -> WebElement:
    element = browser.find_element(By.ID, element_id)
    wait(browser, lambda _: element.is_displayed())
    return element


def open_view(browser: webdriver.Chrome, broker: BrokerProcess, view: str) -> None:
    browser.get(console_url(broker, view))
    name = view.partition("/")[0]  # "group/pay": the group view
    wait(browser, lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-view") == name)


def login(browser: webdriver.Chrome, broker: BrokerProcess) -> None:
    """Log in through the form (after forgetting a secret an earlier test entered)."""
    browser.get(console_url(broker))
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    visible(browser, "login-secret").send_keys(SECRET)
    browser.find_element(By.ID, "login-submit").click()
    wait(browser, text_in("brokers", broker.address))


def unresolved(broker: BrokerProcess) -> list[str]:
    with contextlib.closing(grpc.insecure_channel(broker.address)) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListTransactions(
            admin_pb2.ListTransactionsRequest(unresolvedOnly=True),
            metadata=((ADMIN_SECRET_HEADER, SECRET),),
            timeout=5,
        )
    return [t.header.messageId for t in reply.transactions]


def dead_letters(broker: BrokerProcess, group: str) -> list[admin_pb2.DeadLetterInfo]:
    with contextlib.closing(grpc.insecure_channel(broker.address)) as channel:
        reply = admin_pb2_grpc.AdminStub(channel).ListDeadLetters(
            admin_pb2.ListDeadLettersRequest(
                filter=admin_pb2.DeadLetterFilter(groupId=group), limit=1000
            ),
            metadata=((ADMIN_SECRET_HEADER, SECRET),),
            timeout=5,
        )
    return list(reply.deadLetters)


def consumer(broker: BrokerProcess, group: str, handler: Collector, topic: str) -> Consumer:
    return Consumer(
        brokers=[broker.address],
        group_id=group,
        secret_key="s",
        bindings=[Binding.fanout(topic, persistent=True)],
        handler=handler,
    )


def test_the_page_asks_for_the_secret_and_refuses_a_wrong_one(
    browser: webdriver.Chrome, broker: BrokerProcess
) -> None:
    browser.get(console_url(broker))
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    visible(browser, "login-secret").send_keys("not-the-secret")
    browser.find_element(By.ID, "login-submit").click()
    wait(browser, text_in("login-error", "refused"))
    assert not browser.find_element(By.ID, "view-overview").is_displayed()
    shot(browser, "01-login-refused")
    wait_until(
        lambda: any(
            "admin auth failed" in line and "wrong secret" in line for line in broker.output
        ),
        timeout=60.0,
        what="the refusal's audit line",
    )


def test_each_view_renders(browser: webdriver.Chrome, broker: BrokerProcess) -> None:
    healthy = Collector()
    release = threading.Event()

    def hold(message: ReceivedMessage) -> bool:
        release.wait(60)  # the "slow" group keeps its one message unacked meanwhile
        return True

    slow = Collector(hold)
    with (
        consumer(broker, "healthy", healthy, "trade"),
        consumer(broker, "slow", slow, "audit"),
        Producer(brokers=[broker.address], group_id="pay", secret_key="s") as producer,
        contextlib.ExitStack() as cleanup,
    ):
        cleanup.callback(release.set)  # before the consumers close
        login(browser, broker)
        wait(browser, text_in("rates-legend", "received 0.0/s"))  # sampling has begun
        sent = [
            producer.send(Message(topic="trade", message_type="pay-succ", body=b"x")).message_id
            for _ in range(20)
        ]
        healthy.wait_count(20, timeout=60)
        producer.send(Message(topic="audit", message_type="login", body=b"a"))
        slow.wait_count(1, timeout=60)
        # the next sample sees the counters move: the chart draws a rate above zero
        wait(browser, lambda b: "received 0.0/s" not in b.find_element(By.ID, "rates-legend").text)
        wait(browser, text_in("totals", "21\nreceived"))
        shot(browser, "02-overview")

        open_view(browser, broker, "groups")
        wait(browser, rows_where("groups", lambda r: r[:5] == ["trade", "healthy", "1", "0", "0"]))
        # topic, group, consumers, backlog, unacked, waiting, oldest age (some seconds),
        # dead letters
        wait(
            browser,
            rows_where(
                "groups",
                lambda r: r[:6] == ["audit", "slow", "1", "1", "1", "0"] and " s" in r[6],
            ),
        )
        assert "trade" in [row[0] for row in table_rows(browser, "topics")]
        shot(browser, "03-groups")

        open_view(browser, broker, "group/healthy")
        wait(browser, rows_where("consumers", lambda r: r[-1] == "consumer"))
        assert "trade" in browser.find_element(By.ID, "group-topics").text
        shot(browser, "04-group")

        open_view(browser, broker, f"message/{sent[0]}")
        wait(browser, text_in("timeline", "acked"))
        kinds = [
            e.find_element(By.TAG_NAME, "strong").text
            for e in browser.find_elements(By.CSS_SELECTOR, "#timeline li")
        ]
        assert kinds[0] == "published"
        assert kinds.index("delivered") < kinds.index("acked")
        shot(browser, "05-message")

        open_view(browser, broker, "message/ffffffffffffffffffffffffffffffff")
        wait(browser, text_in("message-error", "No message"))

        open_view(browser, broker, "transactions")
        wait(browser, text_in("tx-counts", "Pending: 0"))
        open_view(browser, broker, "dlq")
        wait(browser, rows_where("dead-letters", lambda r: r == ["(none)"]))


def test_dlq_redrive_previews_then_moves_and_the_group_gets_the_messages_again(
    browser: webdriver.Chrome, broker: BrokerProcess
) -> None:
    failing = Collector(lambda _: False)
    with consumer(broker, "failing", failing, "orders"):
        with Producer(brokers=[broker.address], group_id="pay", secret_key="s") as producer:
            sent = {
                producer.send(
                    Message(topic="orders", message_type="created", body=b"o", deliver_limit=1)
                ).message_id
                for _ in range(N)
            }
        wait_until(
            lambda: len(dead_letters(broker, "failing")) == N,
            timeout=60.0,
            what=f"{N} dead letters",
        )
    login(browser, broker)
    open_view(browser, broker, "dlq")
    browser.find_element(By.ID, "dlq-group").send_keys("failing")
    browser.find_element(By.ID, "dlq-reason").send_keys("deliver_limit")
    browser.find_element(By.ID, "dlq-apply").click()
    wait(browser, lambda b: len(table_rows(b, "dead-letters")) == N)
    assert {row[0] for row in table_rows(browser, "dead-letters")} == sent
    assert {(row[3], row[4]) for row in table_rows(browser, "dead-letters")} == {
        ("failing", "deliver_limit")
    }
    shot(browser, "06-dlq")

    # one row's letter first: the dry run names it, the confirmation moves only it
    one = table_rows(browser, "dead-letters")[0][0]
    click_in_row(browser, "#dead-letters tbody tr", one, "button.redrive-one")
    wait(browser, text_in("redrive-summary", "Dry run: 1 dead letter(s) would be delivered"))
    assert browser.find_element(By.ID, "redrive-list").text == f"{one} → failing"
    assert len(dead_letters(broker, "failing")) == N  # the preview moved nothing
    browser.find_element(By.ID, "redrive-confirm").click()
    wait(browser, text_in("dlq-result", "Redriven: 1 dead letter(s)."))
    wait(browser, lambda b: len(table_rows(b, "dead-letters")) == N - 1)
    assert {letter.header.messageId for letter in dead_letters(broker, "failing")} == sent - {one}

    browser.find_element(By.ID, "dlq-preview").click()
    wait(browser, text_in("redrive-summary", f"Dry run: {N - 1} dead letter(s)"))
    preview = browser.find_element(By.ID, "redrive-list").text
    assert all(f"{message_id} → failing" in preview for message_id in sent - {one})
    shot(browser, "07-redrive-preview")
    assert len(dead_letters(broker, "failing")) == N - 1  # the preview moved nothing
    assert sum("admin redrive" in line for line in broker.output) == 1  # the one letter's

    # another operator redrives a letter meanwhile: the stale confirmation moves nothing
    other = sorted(sent - {one})[0]
    with contextlib.closing(grpc.insecure_channel(broker.address)) as channel:
        admin_pb2_grpc.AdminStub(channel).Redrive(
            admin_pb2.RedriveRequest(messageIds=[other], groupId="failing"),
            metadata=((ADMIN_SECRET_HEADER, SECRET),),
            timeout=5,
        )
    browser.find_element(By.ID, "redrive-confirm").click()
    wait(browser, text_in("redrive-summary", f"{N - 2} letters match now, {N - 1} were previewed"))
    assert len(dead_letters(broker, "failing")) == N - 2
    browser.find_element(By.ID, "dlq-preview").click()
    wait(browser, text_in("redrive-summary", f"Dry run: {N - 2} dead letter(s)"))

    redriven = Collector()
    with consumer(broker, "failing", redriven, "orders"):
        browser.find_element(By.ID, "redrive-confirm").click()
        wait(browser, text_in("dlq-result", f"Redriven: {N - 2} dead letter(s)."))
        shot(browser, "08-redriven")
        redriven.wait_count(N, timeout=60)  # the two single letters waited for the group
    assert set(redriven.ids()) == sent
    assert dead_letters(broker, "failing") == []
    wait(browser, rows_where("dead-letters", lambda r: r == ["(none)"]))
    wait_until(
        lambda: any(
            "admin redrive via=console" in line and f"redriven={N - 2}" in line
            for line in broker.output
        ),
        timeout=60.0,
        what="the redrive's audit line",
    )


def test_an_unresolved_transaction_is_committed_from_the_page_and_delivered(
    browser: webdriver.Chrome, broker: BrokerProcess
) -> None:
    got = Collector()
    with (
        consumer(broker, "ledger", got, "payments"),
        Producer(
            brokers=[broker.address],
            group_id="pay",
            secret_key="s",
            tx_checker=lambda m: TxStatus.UNKNOWN,
        ) as producer,
    ):
        result = producer.send_transactional(
            Message(topic="payments", message_type="settle", body=b"t"),
            lambda m: TxStatus.UNKNOWN,
        )
        message_id = result.message_id
        login(browser, broker)
        open_view(browser, broker, "transactions")
        browser.find_element(By.ID, "tx-unresolved").click()
        # parked unresolved after txCheckMax unanswered checks; then the page lists it
        wait_until(
            lambda: message_id in unresolved(broker), timeout=60.0, what="an unresolved transaction"
        )
        browser.find_element(By.ID, "tx-unresolved").click()
        wait(
            browser,
            rows_where("transactions", lambda r: r[0] == message_id and r[6] == "unresolved"),
        )
        assert got.ids() == []
        shot(browser, "09-transactions")
        click_in_row(browser, "#transactions tbody tr", message_id, "button.commit")
        wait(browser, expected_conditions.alert_is_present())
        browser.switch_to.alert.accept()
        wait(browser, text_in("tx-result", f"Committed {message_id}."))
        shot(browser, "10-committed")
        got.wait_for(lambda received: any(m.message_id == message_id for m in received), 60)
    wait_until(
        lambda: any(
            "admin commit via=console" in line and f"id={message_id} changed=True" in line
            for line in broker.output
        ),
        timeout=60.0,
        what="the commit's audit line",
    )
    open_view(browser, broker, f"message/{message_id}")
    wait(browser, text_in("timeline", "committed"))
    shot(browser, "11-message-committed")
