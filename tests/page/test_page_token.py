"""A server with a token: the page (public) asks for the token once, then lists the runs with it; the API without it
stays closed. No console error but the one refusal that makes the page ask."""
import httpx
import pytest
from page_testutil import Server, browser, close, console_errors, foreign_resources, needs_chromium, wait_for


@pytest.mark.slow  # a server start and a browser: about 40 s on a loaded 2-core machine
def test_the_page_asks_for_the_token_once_and_then_works_with_it(tmp_path):
    needs_chromium()
    server = Server(tmp_path / "data", "--devices", "cpu", token="tok-123")
    driver = browser()
    try:
        assert httpx.get(server.url + "/").status_code == 200 and httpx.get(server.url + "/jobs").status_code == 401
        driver.get(server.url + "/#/")
        token = wait_for(driver, lambda d: d.find_element("id", "token-input").is_displayed() and d.find_element("id", "token-input"),
                         "the token dialog")
        token.send_keys("tok-123")
        driver.find_element("css selector", "#token-form button").click()
        wait_for(driver, lambda d: "No runs yet" in d.find_element("css selector", "main").text, "the runs list with the token")
        driver.refresh()  # kept for the tab: not asked again
        wait_for(driver, lambda d: "No runs yet" in d.find_element("css selector", "main").text, "the runs list after a reload")
        assert not driver.find_element("id", "token-input").is_displayed()
        assert console_errors(driver, ("the server responded with a status of 401",)) == []
        assert foreign_resources(driver, server.url) == []
    finally:
        close(driver)
        server.stop()
