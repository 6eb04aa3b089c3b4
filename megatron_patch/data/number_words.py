"""Cardinal numbers 0-99 written out in English, German, French and Spanish (the languages of
the built-in corpus), by each language's rules: English "forty-two", German "zweiundvierzig",
French "quatre-vingt-onze" (traditional spelling, "vingt et un"), Spanish "cuarenta y dos"."""

from __future__ import annotations

LANGUAGES = {"en": "English", "de": "German", "fr": "French", "es": "Spanish"}

_EN_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
             "fourteen fifteen sixteen seventeen eighteen nineteen").split()
_EN_TENS = {20: "twenty", 30: "thirty", 40: "forty", 50: "fifty", 60: "sixty", 70: "seventy",
            80: "eighty", 90: "ninety"}

_DE_UNITS = ("null eins zwei drei vier fünf sechs sieben acht neun zehn elf zwölf dreizehn "
             "vierzehn fünfzehn sechzehn siebzehn achtzehn neunzehn").split()
_DE_TENS = {20: "zwanzig", 30: "dreißig", 40: "vierzig", 50: "fünfzig", 60: "sechzig",
            70: "siebzig", 80: "achtzig", 90: "neunzig"}

_FR_UNITS = ("zéro un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze "
             "quinze seize dix-sept dix-huit dix-neuf").split()
_FR_TENS = {20: "vingt", 30: "trente", 40: "quarante", 50: "cinquante", 60: "soixante"}

_ES_UNITS = ("cero uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce "
             "quince dieciséis diecisiete dieciocho diecinueve veinte veintiuno veintidós "
             "veintitrés veinticuatro veinticinco veintiséis veintisiete veintiocho "
             "veintinueve").split()
_ES_TENS = {30: "treinta", 40: "cuarenta", 50: "cincuenta", 60: "sesenta", 70: "setenta",
            80: "ochenta", 90: "noventa"}


def _english(n: int) -> str:
    if n < 20:
        return _EN_UNITS[n]
    tens, unit = divmod(n, 10)
    return _EN_TENS[tens * 10] + (f"-{_EN_UNITS[unit]}" if unit else "")


def _german(n: int) -> str:
    if n < 20:
        return _DE_UNITS[n]
    tens, unit = divmod(n, 10)
    if not unit:
        return _DE_TENS[tens * 10]
    return ("ein" if unit == 1 else _DE_UNITS[unit]) + "und" + _DE_TENS[tens * 10]


def _french(n: int) -> str:
    if n < 20:
        return _FR_UNITS[n]
    if n < 70:
        tens, unit = divmod(n, 10)
        if unit == 0:
            return _FR_TENS[tens * 10]
        return _FR_TENS[tens * 10] + (" et un" if unit == 1 else f"-{_FR_UNITS[unit]}")
    if n < 80:  # soixante-dix .. soixante-dix-neuf, "soixante et onze"
        return "soixante et onze" if n == 71 else f"soixante-{_FR_UNITS[n - 60]}"
    if n == 80:
        return "quatre-vingts"
    return f"quatre-vingt-{_FR_UNITS[n - 80]}"


def _spanish(n: int) -> str:
    if n < 30:
        return _ES_UNITS[n]
    tens, unit = divmod(n, 10)
    return _ES_TENS[tens * 10] + (f" y {_ES_UNITS[unit]}" if unit else "")


_WRITERS = {"en": _english, "de": _german, "fr": _french, "es": _spanish}


def number_word(n: int, language: str) -> str:
    """``n`` (0-99) in ``language`` (a key of ``LANGUAGES``)."""
    if not 0 <= n <= 99:
        raise ValueError(f"number_word: {n} is outside 0-99")
    return _WRITERS[language](n)
