"""
Tests for L{tabbyproxy.sizes}: sizes as people write them, and as the proxy writes them back.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tabbyproxy.sizes import GiB, MiB, SizeError, formatGiB, parseSize


class SizeTests(SynchronousTestCase):
    """
    L{parseSize} and L{formatGiB}.
    """

    def test_units(self) -> None:
        """
        K, M, G and T and their iB forms are binary, KB, MB, GB and TB decimal, in any case,
        with a fraction and spaces allowed.
        """
        self.assertEqual(parseSize("24GiB"), 24 * GiB)
        self.assertEqual(parseSize("24g"), 24 * GiB)
        self.assertEqual(parseSize("24000MiB"), 24000 * MiB)
        self.assertEqual(parseSize("1.5 GB"), 1_500_000_000)
        self.assertEqual(parseSize(" 512 k "), 512 * 1024)
        self.assertEqual(parseSize("1TiB"), 1024 * GiB)
        self.assertEqual(parseSize("100b"), 100)

    def test_refused(self) -> None:
        """
        A bare number, an unknown unit, a negative size or a value that is not text is refused
        with a message that shows what works.
        """
        for value in ("24", "24 gallons", "-1GiB", "GiB", "", 24, None):
            with self.subTest(value=value):
                error = self.assertRaises(SizeError, parseSize, value)
                self.assertIn("such as 24GiB", str(error))

    def test_format(self) -> None:
        """
        Sizes are shown in GiB with one decimal.
        """
        self.assertEqual(formatGiB(18 * GiB), "18.0 GiB")
        self.assertEqual(formatGiB(1536 * MiB), "1.5 GiB")
