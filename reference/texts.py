"""Texts for the tokenizer / chat-template fixtures (real sentences in the 23 languages of the model card)."""
import json

LANGS = {
    "arabic": "تعلم اللغات الجديدة يفتح أبوابًا كثيرة للتواصل مع ثقافات العالم.",
    "chinese": "我们明天早上九点在火车站见面，然后一起去博物馆参观。",
    "czech": "Příliš žluťoučký kůň úpěl ďábelské ódy a pak odešel domů.",
    "danish": "Vi tager toget til København i morgen og besøger vores bedsteforældre.",
    "dutch": "De fietsenmaker op de hoek repareert mijn band voor zaterdagochtend.",
    "english": "The quick brown fox jumps over the lazy dog while the farmer isn't watching.",
    "finnish": "Huomenna sataa luultavasti lunta, joten ota lämpimät kengät mukaan.",
    "french": "Nous irons au marché samedi matin pour acheter du fromage et du pain frais.",
    "german": "Können Sie mir bitte sagen, wie ich am schnellsten zum Hauptbahnhof komme?",
    "hebrew": "אנחנו נפגשים מחר בבוקר בבית הקפה ליד הספרייה העירונית.",
    "hungarian": "Árvíztűrő tükörfúrógép: ez a mondat a magyar ékezetes betűk próbája.",
    "italian": "Domani andremo al mare con gli amici e mangeremo una pizza sulla spiaggia.",
    "japanese": "今日はとても良い天気なので、公園を散歩してからお茶を飲みましょう。",
    "korean": "오늘 저녁에 친구들과 함께 한국 음식을 먹으러 갈 거예요.",
    "norwegian": "Vi skal på hytta i helgen og håper det blir fint vær på fjellet.",
    "polish": "Zażółć gęślą jaźń, a potem wypij filiżankę gorącej herbaty.",
    "portuguese": "Amanhã vamos visitar a nossa avó no interior e almoçar com toda a família.",
    "russian": "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "spanish": "¿Dónde está la biblioteca? Necesito devolver estos libros antes del viernes.",
    "swedish": "Flygande bäckasiner söka hwila på mjuka tuvor medan solen går ner.",
    "thai": "วันนี้อากาศดีมาก เราจะไปเดินเล่นที่สวนสาธารณะกันไหม",
    "turkish": "Yarın sabah erkenden kalkıp İstanbul'a giden ilk trene bineceğiz.",
    "ukrainian": "Щастям б'єш жук їх глицю в фон й ґедзь пріч, а потім п'єш чай."}
EXTRA = {
    "python_code": 'def fib(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    a, b = 0, 1\n'
                   '    for _ in range(n):\n\ta, b = b, a + b  # tab-indented\n    return a\n\nprint(fib(10))  # 55\n',
    "emoji": "I love 🍕 and 🎉! Family: 👨‍👩‍👧‍👦, flags: 🇫🇷🇯🇵🇺🇦, thumbs: 👍🏽, rainbow: 🏳️‍🌈, ❤️‍🔥",
    "whitespace": "  two leading\tand\ttabs\n\n\nthree newlines \r\n crlf\u00a0nbsp   \n \n  trailing   ",
    "numbers_case": "Prices: 1234567 dollars, 3.14159, 2024-06-01; I'M SURE you'll see THEY'RE right.",
    "empty": "",
    "special_rstrip": "<|user|>hi<|end|>\n<|assistant|>  x",
    "special_image": "<|endoftext10|>",
    "special_mixed": "<|system|>  You are helpful.<|end|>\n<|user|>\n\n<|image_1|>\nDescribe <|endoftext10|>"
                     "<|endoftext10|> and <|endoftext11|>.<|end|>\n<|assistant|>",
    "special_tools": " <|tool|>[{\"name\": \"f\"}]<|/tool|>\n <|tool_call|>{}<|/tool_call|>  <|tool_response|> ok <|tag|>",
    "special_lookalikes": "<|endoftext|>x<|endofprompt|> <|user |> <|end| <|END|> <|endoftext12|>"}
TOOLS = json.dumps([{"name": "get_weather", "description": "Get the current weather for a city.",
                     "parameters": {"city": {"description": "City name", "type": "str"}}}])
SYSTEM = "You are a helpful assistant."
CHATS = [
    ("single_user", [{"role": "user", "content": "Hello, who are you?"}], True),
    ("system_user", [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": "What is the capital of France? Answer in one word."}], True),
    ("multi_turn", [{"role": "user", "content": "Hi! Can you help me plan a trip to Japan?"},
                    {"role": "assistant", "content": "Of course! How many days, and which cities interest you?"},
                    {"role": "user", "content": "Ten days, mostly Tokyo and Kyoto.\nI like food and temples."}], True),
    ("system_tools", [{"role": "system", "content": "You are a helpful assistant with some tools.", "tools": TOOLS},
                      {"role": "user", "content": "What is the weather like in Paris today?"}], True),
    ("tool_call", [{"role": "system", "content": "You are a helpful assistant with some tools.", "tools": TOOLS},
                   {"role": "user", "content": "What is the weather like in Paris today?"},
                   {"role": "assistant", "content": '<|tool_call|>[{"name": "get_weather", "arguments": '
                                                    '{"city": "Paris"}}]<|/tool_call|>'},
                   {"role": "tool", "content": '{"temperature_c": 21, "sky": "sunny"}'}], True),
    ("no_generation_prompt", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Say hi."},
                              {"role": "assistant", "content": "Hi!"}], False)]
