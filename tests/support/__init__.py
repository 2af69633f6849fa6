"""
What the tests share: in-memory fakes of TabbyAPI, the process reactor and the proxy
(L{tests.support.fakes}); real child processes of the simulator (L{tests.support.simulator}) and of
the proxy, in process or under C{twistd} (L{tests.support.proxy}).
"""
